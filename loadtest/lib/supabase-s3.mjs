// One S3 transfer against Supabase Storage's S3 protocol, for loadtest/supabase-transfer.sh:
// PutObject of FILE (streamed, Content-Length given) or GetObject streamed to nowhere, with the
// AWS SDK v3 (tests/supabase/package.json pins it), path-style, SigV4 with the credentials the
// acceptance suite uses. Prints one JSON line: {"ok", "status", "ms", "bytes", "error"}; `ms` is
// the request alone, from send to the last body byte (not Node's start-up or the SDK's import).
//
// Usage: node loadtest/lib/supabase-s3.mjs put|get ENDPOINT BUCKET KEY [FILE]
//   environment: S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_REGION (default us-east-1)
import { createReadStream, statSync } from 'node:fs'
import { GetObjectCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3'

const [op, endpoint, bucket, key, file] = process.argv.slice(2)
if (!['put', 'get'].includes(op) || !endpoint || !bucket || !key || (op === 'put' && !file)) {
  console.error('usage: node supabase-s3.mjs put|get ENDPOINT BUCKET KEY [FILE]')
  process.exit(2)
}

const client = new S3Client({
  endpoint,
  forcePathStyle: true,
  region: process.env.S3_REGION || 'us-east-1',
  credentials: {
    accessKeyId: process.env.S3_ACCESS_KEY_ID,
    secretAccessKey: process.env.S3_SECRET_ACCESS_KEY,
  },
  maxAttempts: 1,
})

const started = performance.now()
try {
  let bytes = 0
  let status
  if (op === 'put') {
    const size = statSync(file).size
    const out = await client.send(
      new PutObjectCommand({
        Bucket: bucket,
        Key: key,
        Body: createReadStream(file, { highWaterMark: 1 << 20 }),
        ContentLength: size,
        ContentType: 'application/octet-stream',
      })
    )
    status = out.$metadata.httpStatusCode
    bytes = size
  } else {
    const out = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }))
    status = out.$metadata.httpStatusCode
    for await (const chunk of out.Body) bytes += chunk.length
  }
  const ms = performance.now() - started
  console.log(JSON.stringify({ ok: true, status, ms: Math.round(ms), bytes }))
} catch (error) {
  const ms = performance.now() - started
  const status = error.$metadata?.httpStatusCode ?? 0
  console.log(JSON.stringify({ ok: false, status, ms: Math.round(ms), bytes: 0, error: `${error.name}: ${error.message}`.slice(0, 300) }))
  process.exitCode = 1
}
