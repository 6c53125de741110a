// supabase-js against the real Storage server through BASE (imgedge, or the gateway for
// reference), as an application would use it: buckets, upload, download, public URLs with and
// without a transform, signed URLs with and without one, list, update, move, remove, signed
// uploads. Every URL the client hands out is fetched through BASE, and what comes back is
// checked: status, Content-Type, bytes, and for transforms the output's pixel size (read from the
// PNG, JPEG or WebP header here). The expectations are what a user of supabase-js expects of a
// Storage project; imgedge's own behaviour is not written into them.
//
// Usage: node client.mjs BASE FIXTURES_DIR [LABEL]
//   BASE: the project URL supabase-js is given (it appends /storage/v1), e.g. http://127.0.0.1:8080
//   environment: SB_SERVICE_KEY (a service_role JWT of the server)
// Prints one line per call and a summary; exits 1 when any check fails.
// The PNGs are made here (zlib); fixtures/photo-120x90.jpg is a baseline JPEG made with Pillow.
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { deflateSync } from 'node:zlib'
import { createClient } from '@supabase/supabase-js'

const [base, fixtures, label = 'imgedge'] = process.argv.slice(2)
const serviceKey = process.env.SB_SERVICE_KEY
if (!base || !fixtures || !serviceKey) {
  console.error('usage: SB_SERVICE_KEY=... node client.mjs BASE FIXTURES_DIR [LABEL]')
  process.exit(2)
}

const supabase = createClient(base, serviceKey, {
  auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
})
const run = Date.now().toString(36)
const publicBucket = `client-public-${run}`
const privateBucket = `client-private-${run}`
const wide = png(128, 96, 0) // landscape
const tall = png(96, 128, 1) // portrait, other colours: the "new version" of an object
const jpeg = readFileSync(join(fixtures, 'photo-120x90.jpg'))

let passed = 0
let failed = 0
const failures = []

/** Runs one check: `fn` returns a detail string or throws. */
async function check(name, fn) {
  try {
    const detail = await fn()
    passed++
    console.log(`client (${label}): ok   ${name}${detail ? `: ${detail}` : ''}`)
  } catch (error) {
    failed++
    failures.push(name)
    console.log(`client (${label}): FAIL ${name}: ${error.message}`)
  }
}

function must(condition, message) {
  if (!condition) throw new Error(message)
}

/** supabase-js's { data, error }: the data, or the error thrown with its status and body. */
function ok({ data, error }) {
  if (error) {
    const status = error.statusCode ?? error.status ?? ''
    throw new Error(`${error.name ?? 'error'} ${status}: ${error.message}`)
  }
  return data
}

async function bytesOf(blob) {
  return Buffer.from(await blob.arrayBuffer())
}

/** GET url; returns { status, type, body, cache, headers }. */
async function get(url, headers = {}) {
  const response = await fetch(url, { headers })
  const body = Buffer.from(await response.arrayBuffer())
  return {
    status: response.status,
    type: response.headers.get('content-type') ?? '',
    cache: response.headers.get('cache-status') ?? '',
    body,
    headers: response.headers,
  }
}

function describe(r) {
  const text = r.type.startsWith('application/json') ? ` ${r.body.toString().slice(0, 200)}` : ''
  return `${r.status} ${r.type || '(no type)'} ${r.body.length} B${r.cache ? ` [${r.cache}]` : ''}${text}`
}

function mustBeOriginal(r, type, original) {
  must(r.status === 200, `expected 200 ${type}, got ${describe(r)}`)
  must(r.type.split(';')[0] === type, `expected Content-Type ${type}, got ${describe(r)}`)
  must(r.body.equals(original), `body differs from what was uploaded (${r.body.length} B vs ${original.length} B)`)
  return describe(r)
}

function mustBeImage(r, width, height) {
  must(r.status === 200, `expected 200, got ${describe(r)}`)
  const size = imageSize(r.body)
  must(size, `not a PNG, JPEG or WebP: ${describe(r)}`)
  must(r.type.split(';')[0] === `image/${size.format}`, `Content-Type ${r.type} but the body is ${size.format}`)
  must(size.width === width, `expected width ${width}, got ${size.width}x${size.height} (${describe(r)})`)
  if (height !== undefined) {
    must(size.height === height, `expected height ${height}, got ${size.width}x${size.height} (${describe(r)})`)
  }
  return `${describe(r)}, ${size.format} ${size.width}x${size.height}`
}

function mustBeGone(r) {
  // Storage answers a missing object with 400 {"statusCode":"404","error":"not_found"}.
  must(r.status === 400 || r.status === 404, `expected 400/404 (object gone), got ${describe(r)}`)
  return describe(r)
}

// ----- the calls -----

await check('createBucket (public)', async () => {
  ok(await supabase.storage.createBucket(publicBucket, { public: true }))
  return publicBucket
})
await check('createBucket (private)', async () => {
  ok(await supabase.storage.createBucket(privateBucket, { public: false }))
  return privateBucket
})
await check('upload PNG to the public bucket', async () => {
  const data = ok(await supabase.storage.from(publicBucket).upload('pics/cat.png', wide, { contentType: 'image/png' }))
  return data.path
})
await check('upload JPEG to the private bucket', async () => {
  const data = ok(await supabase.storage.from(privateBucket).upload('pics/photo.jpg', jpeg, { contentType: 'image/jpeg' }))
  return data.path
})
await check('download (public bucket)', async () => {
  const body = await bytesOf(ok(await supabase.storage.from(publicBucket).download('pics/cat.png')))
  must(body.equals(wide), `downloaded ${body.length} B differ from the ${wide.length} B uploaded`)
  return `${body.length} B`
})
await check('download (private bucket)', async () => {
  const body = await bytesOf(ok(await supabase.storage.from(privateBucket).download('pics/photo.jpg')))
  must(body.equals(jpeg), `downloaded ${body.length} B differ from the ${jpeg.length} B uploaded`)
  return `${body.length} B`
})
await check('exists', async () => {
  const data = ok(await supabase.storage.from(privateBucket).exists('pics/photo.jpg'))
  must(data === true, `exists() said ${data}`)
  return 'true'
})

const publicUrl = supabase.storage.from(publicBucket).getPublicUrl('pics/cat.png').data.publicUrl
await check('getPublicUrl, fetched', async () => mustBeOriginal(await get(publicUrl), 'image/png', wide))
await check('getPublicUrl, fetched again (cacheable: same bytes)', async () =>
  mustBeOriginal(await get(publicUrl), 'image/png', wide)
)
const renderUrl = (transform) =>
  supabase.storage.from(publicBucket).getPublicUrl('pics/cat.png', { transform }).data.publicUrl
await check('getPublicUrl with transform { width: 40 }, fetched', async () =>
  mustBeImage(await get(renderUrl({ width: 40 })), 40, 30)
)
await check("getPublicUrl with transform { width: 50, height: 50, resize: 'cover' }, fetched", async () =>
  mustBeImage(await get(renderUrl({ width: 50, height: 50, resize: 'cover' })), 50, 50)
)
await check('getPublicUrl with transform { width: 40 }, Accept: image/webp', async () =>
  mustBeImage(await get(renderUrl({ width: 40 }), { accept: 'image/webp,image/*' }), 40, 30)
)

await check('createSignedUrl, fetched', async () => {
  const { signedUrl } = ok(await supabase.storage.from(privateBucket).createSignedUrl('pics/photo.jpg', 120))
  return mustBeOriginal(await get(signedUrl), 'image/jpeg', jpeg)
})
await check('createSignedUrl with transform { width: 60 }, fetched', async () => {
  const { signedUrl } = ok(
    await supabase.storage.from(privateBucket).createSignedUrl('pics/photo.jpg', 120, { transform: { width: 60 } })
  )
  return mustBeImage(await get(signedUrl), 60, 45)
})
await check('createSignedUrls, fetched', async () => {
  const data = ok(await supabase.storage.from(privateBucket).createSignedUrls(['pics/photo.jpg'], 120))
  must(data.length === 1 && data[0].signedUrl, `no signed URL: ${JSON.stringify(data)}`)
  return mustBeOriginal(await get(data[0].signedUrl), 'image/jpeg', jpeg)
})
await check('download with transform { width: 60 } (authenticated render)', async () => {
  const blob = ok(await supabase.storage.from(privateBucket).download('pics/photo.jpg', { transform: { width: 60 } }))
  const body = await bytesOf(blob)
  const size = imageSize(body)
  must(size && size.width === 60, `expected a 60 px wide image, got ${size ? `${size.format} ${size.width}x${size.height}` : `${body.length} B, not an image`}`)
  return `${size.format} ${size.width}x${size.height}`
})

await check('list', async () => {
  const data = ok(await supabase.storage.from(publicBucket).list('pics'))
  must(data.some((o) => o.name === 'cat.png'), `cat.png not listed: ${JSON.stringify(data.map((o) => o.name))}`)
  return data.map((o) => o.name).join(', ')
})

// A new version through the same client: its public and render URLs serve the new one.
await check('update (new version of the public object)', async () => {
  ok(await supabase.storage.from(publicBucket).update('pics/cat.png', tall, { contentType: 'image/png' }))
  return `${tall.length} B`
})
await check('getPublicUrl after update serves the new version', async () =>
  mustBeOriginal(await get(publicUrl), 'image/png', tall)
)
await check('getPublicUrl with transform { width: 40 } after update renders the new version', async () =>
  mustBeImage(await get(renderUrl({ width: 40 })), 40, 53)
)

await check('move', async () => {
  ok(await supabase.storage.from(publicBucket).move('pics/cat.png', 'pics/moved.png'))
  const body = await bytesOf(ok(await supabase.storage.from(publicBucket).download('pics/moved.png')))
  must(body.equals(tall), 'the moved object differs')
  return 'pics/cat.png -> pics/moved.png'
})
const movedUrl = supabase.storage.from(publicBucket).getPublicUrl('pics/moved.png').data.publicUrl
await check('getPublicUrl of the new path after move', async () => mustBeOriginal(await get(movedUrl), 'image/png', tall))
await check('getPublicUrl of the old path after move is gone', async () => mustBeGone(await get(publicUrl)))

await check('remove', async () => {
  const data = ok(await supabase.storage.from(publicBucket).remove(['pics/moved.png']))
  must(data.length === 1, `removed ${data.length} objects`)
  return 'pics/moved.png'
})
await check('getPublicUrl after remove is gone', async () => mustBeGone(await get(movedUrl)))

await check('createSignedUploadUrl + uploadToSignedUrl', async () => {
  const { token, path } = ok(await supabase.storage.from(privateBucket).createSignedUploadUrl('uploads/signed.png'))
  ok(await supabase.storage.from(privateBucket).uploadToSignedUrl(path, token, wide, { contentType: 'image/png' }))
  const body = await bytesOf(ok(await supabase.storage.from(privateBucket).download('uploads/signed.png')))
  must(body.equals(wide), 'the object uploaded to the signed URL differs')
  return `${path}, ${body.length} B`
})

await check('emptyBucket + deleteBucket', async () => {
  ok(await supabase.storage.emptyBucket(privateBucket))
  ok(await supabase.storage.deleteBucket(privateBucket))
  return privateBucket
})

console.log(`client (${label}): ${passed} passed, ${failed} failed${failed ? ` (${failures.join('; ')})` : ''}`)
process.exit(failed ? 1 : 0)

// ----- images -----

/** An RGB PNG of width x height, a gradient (variant picks the colours). */
function png(width, height, variant) {
  const raw = Buffer.alloc((width * 3 + 1) * height)
  for (let y = 0; y < height; y++) {
    const row = y * (width * 3 + 1)
    for (let x = 0; x < width; x++) {
      const i = row + 1 + x * 3
      raw[i] = variant ? 255 - (x * 255) / width : (x * 255) / width
      raw[i + 1] = (y * 255) / height
      raw[i + 2] = variant ? 60 : 160
    }
  }
  const chunk = (type, data) => {
    const length = Buffer.alloc(4)
    length.writeUInt32BE(data.length)
    const body = Buffer.concat([Buffer.from(type, 'latin1'), data])
    const crc = Buffer.alloc(4)
    crc.writeUInt32BE(crc32(body))
    return Buffer.concat([length, body, crc])
  }
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(width, 0)
  ihdr.writeUInt32BE(height, 4)
  ihdr.set([8, 2, 0, 0, 0], 8) // 8-bit RGB, no interlace
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(raw)),
    chunk('IEND', Buffer.alloc(0)),
  ])
}

function crc32(buf) {
  let c = ~0
  for (const byte of buf) {
    c ^= byte
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1))
  }
  return ~c >>> 0
}

/** { format, width, height } from a PNG, JPEG or WebP header; null for anything else. */
function imageSize(b) {
  if (b.length > 24 && b.readUInt32BE(0) === 0x89504e47 && b.toString('latin1', 12, 16) === 'IHDR') {
    return { format: 'png', width: b.readUInt32BE(16), height: b.readUInt32BE(20) }
  }
  if (b.length > 4 && b[0] === 0xff && b[1] === 0xd8) {
    let i = 2
    while (i + 9 < b.length) {
      if (b[i] !== 0xff) return null
      const marker = b[i + 1]
      if (marker === 0xff) {
        i++
        continue
      }
      const length = b.readUInt16BE(i + 2)
      // SOF0-SOF15 but DHT (c4), JPG (c8) and DAC (cc)
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        return { format: 'jpeg', height: b.readUInt16BE(i + 5), width: b.readUInt16BE(i + 7) }
      }
      i += 2 + length
    }
    return null
  }
  if (b.length > 30 && b.toString('latin1', 0, 4) === 'RIFF' && b.toString('latin1', 8, 12) === 'WEBP') {
    const kind = b.toString('latin1', 12, 16)
    if (kind === 'VP8 ') {
      return { format: 'webp', width: b.readUInt16LE(26) & 0x3fff, height: b.readUInt16LE(28) & 0x3fff }
    }
    if (kind === 'VP8L') {
      const bits = b.readUInt32LE(21)
      return { format: 'webp', width: (bits & 0x3fff) + 1, height: ((bits >> 14) & 0x3fff) + 1 }
    }
    if (kind === 'VP8X') {
      return { format: 'webp', width: b.readUIntLE(24, 3) + 1, height: b.readUIntLE(27, 3) + 1 }
    }
  }
  return null
}
