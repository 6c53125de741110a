#!/usr/bin/env node
// The sharp peer of loadtest/sharp.sh: a Node image proxy written the way our users' Node services
// are, for measuring imgedge against them. Not a production service: no cache, no SSRF checks, no
// limits beyond sharp's own (loopback tests only).
//
//   GET /image-proxy?url=URL&w=W&h=H&q=Q&format=F
//     fetch URL with Node's fetch, the whole body into a Buffer; sharp(buf).resize(W, H) with
//     sharp's defaults (fit cover, centre, Lanczos3, upscaling allowed, EXIF orientation NOT
//     applied, metadata stripped, ICC converted to sRGB); F = webp | jpeg (jpg) | png | avif, or
//     none: the source's format (sharp's metadata().format); Q (1-100, default 80) is passed as
//     `.toFormat(F, { quality: Q })` to the lossy formats (jpeg, webp, avif) only: for png sharp's
//     `quality` turns on palette quantisation (lossy PNG), which imgedge does not do, so PNG is
//     encoded with sharp's PNG defaults (zlib level 6, no palette), as imgedge's PNG is lossless.
//     Answers the image with its Content-Type and Content-Length; errors are JSON
//     {"error": CODE, "message": TEXT}: 400 bad_parameter / bad_url, 502 origin_status /
//     fetch_failed / transform_failed.
//   GET /__up      200 "up"
//   GET /__version JSON: node, sharp and libvips versions, sharp.concurrency(), the libuv pool size
//
// Usage: PORT=8090 node server.js   (binds 127.0.0.1 only; HOST may name another loopback address)
// sharp's defaults are kept on purpose (sharp.concurrency(): 1 libvips thread per image on glibc;
// libuv's 4 threadpool threads unless UV_THREADPOOL_SIZE; libvips' operation cache 50 MiB / 100
// operations / 20 files), since that is how the services we compare with run.
'use strict'

const http = require('node:http')
const sharp = require('sharp')

const PORT = Number(process.env.PORT || 8090)
const HOST = process.env.HOST || '127.0.0.1'
const FORMATS = { jpeg: 'jpeg', jpg: 'jpeg', png: 'png', webp: 'webp', avif: 'avif' }
const LOSSY = new Set(['jpeg', 'webp', 'avif'])
const TYPES = {
  jpeg: 'image/jpeg',
  png: 'image/png',
  webp: 'image/webp',
  gif: 'image/gif',
  avif: 'image/avif',
  heif: 'image/avif', // sharp reports AVIF output as heif
  tiff: 'image/tiff'
}
const MAX_DIMENSION = 16383 // WebP's own limit; larger is a 400

class HttpError extends Error {
  constructor (status, code, message) {
    super(message)
    this.status = status
    this.code = code
  }
}

function sendJson (res, status, body) {
  const text = JSON.stringify(body) + '\n'
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(text),
    'Cache-Control': 'no-store'
  })
  res.end(text)
}

function intParam (params, name, min, max) {
  const raw = params.get(name)
  if (raw === null || raw === '') return null
  if (!/^[0-9]{1,6}$/.test(raw)) throw new HttpError(400, 'bad_parameter', `${name}=${raw} is not an integer`)
  const n = Number(raw)
  if (n < min || n > max) throw new HttpError(400, 'bad_parameter', `${name}=${raw} is not in ${min}-${max}`)
  return n
}

function parse (params) {
  const target = params.get('url')
  if (!target) throw new HttpError(400, 'bad_url', 'url= is required')
  let url
  try {
    url = new URL(target)
  } catch {
    throw new HttpError(400, 'bad_url', 'url= is not an absolute URL')
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new HttpError(400, 'bad_url', 'url= must be http or https')
  }
  const w = intParam(params, 'w', 1, MAX_DIMENSION)
  const h = intParam(params, 'h', 1, MAX_DIMENSION)
  const q = intParam(params, 'q', 1, 100) ?? 80
  const f = params.get('format')
  let format = null
  if (f !== null && f !== '') {
    format = FORMATS[f.toLowerCase()]
    if (!format) throw new HttpError(400, 'bad_parameter', `format=${f}: want webp, jpeg, png or avif`)
  }
  return { url: url.href, w, h, q, format }
}

async function fetchBody (url) {
  let res
  try {
    res = await fetch(url, { redirect: 'follow' })
  } catch (err) {
    throw new HttpError(502, 'fetch_failed', String(err.cause?.message || err.message))
  }
  if (!res.ok) {
    await res.body?.cancel().catch(() => {})
    throw new HttpError(502, 'origin_status', `the origin answered ${res.status}`)
  }
  try {
    return Buffer.from(await res.arrayBuffer())
  } catch (err) {
    throw new HttpError(502, 'fetch_failed', String(err.cause?.message || err.message))
  }
}

async function render ({ url, w, h, q, format }) {
  const buf = await fetchBody(url)
  try {
    const img = sharp(buf)
    let out = format
    if (!out) {
      out = (await img.metadata()).format // the source's format
    }
    if (w || h) img.resize(w, h)
    img.toFormat(out, LOSSY.has(out) ? { quality: q } : {})
    const { data, info } = await img.toBuffer({ resolveWithObject: true })
    return { data, type: TYPES[info.format] || 'application/octet-stream' }
  } catch (err) {
    throw new HttpError(502, 'transform_failed', String(err.message).split('\n')[0])
  }
}

const server = http.createServer(async (req, res) => {
  try {
    const u = new URL(req.url, 'http://peer')
    if (u.pathname === '/__up') {
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 3 })
      return res.end('up\n')
    }
    if (u.pathname === '/__version') {
      return sendJson(res, 200, {
        node: process.version,
        sharp: sharp.versions.sharp,
        libvips: sharp.versions.vips,
        concurrency: sharp.concurrency(),
        uv_threadpool_size: Number(process.env.UV_THREADPOOL_SIZE || 4),
        simd: sharp.simd()
      })
    }
    if (u.pathname !== '/image-proxy') throw new HttpError(404, 'not_found', 'no such route')
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      throw new HttpError(405, 'method_not_allowed', 'GET or HEAD')
    }
    const { data, type } = await render(parse(u.searchParams))
    res.writeHead(200, { 'Content-Type': type, 'Content-Length': data.length, 'Cache-Control': 'no-store' })
    res.end(req.method === 'HEAD' ? undefined : data)
  } catch (err) {
    if (res.headersSent) return res.destroy()
    if (err instanceof HttpError) return sendJson(res, err.status, { error: err.code, message: err.message })
    sendJson(res, 500, { error: 'internal', message: String(err && err.message) })
  }
})

server.keepAliveTimeout = 65000
server.listen(PORT, HOST, () => {
  console.log(`sharp peer: node ${process.version}, sharp ${sharp.versions.sharp}, libvips ${sharp.versions.vips}, ` +
    `concurrency ${sharp.concurrency()}, on http://${HOST}:${server.address().port}`)
})
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close(() => process.exit(0))
    server.closeAllConnections()
    setTimeout(() => process.exit(0), 2000).unref()
  })
}
