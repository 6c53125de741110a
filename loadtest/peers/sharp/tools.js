#!/usr/bin/env node
// Helpers of loadtest/sharp.sh that use the peer's sharp (no other image tool is needed):
//
//   node tools.js gif SRC OUT [FRAMES=6] [WIDTH=1024]
//     writes an animated GIF (looping, 100 ms a frame) of FRAMES frames, each SRC resized to WIDTH
//     wide (16:9, centre crop) with its hue turned by 360/FRAMES degrees more than the last, so
//     every frame differs; prints `OUT WIDTHxHEIGHT FRAMES BYTES`
//   node tools.js probe FILE...
//     one line per file: `FILE<TAB>format<TAB>width<TAB>height<TAB>pages<TAB>chroma` (height of
//     one page; chroma: a JPEG's chroma subsampling, e.g. 4:2:0, else -), or
//     `FILE<TAB>error<TAB>0<TAB>0<TAB>0<TAB>-` when sharp cannot read it
'use strict'

const fs = require('node:fs')
const sharp = require('sharp')

async function gif (src, out, frames = 6, width = 1024) {
  const height = Math.round(width * 9 / 16)
  const base = await sharp(src).resize(width, height).removeAlpha().toColourspace('srgb').raw().toBuffer()
  const pages = []
  for (let i = 0; i < frames; i++) {
    pages.push(await sharp(base, { raw: { width, height, channels: 3 } })
      .modulate({ hue: Math.round(i * 360 / frames) }).raw().toBuffer())
  }
  await sharp(Buffer.concat(pages), { raw: { width, height: height * frames, channels: 3, pageHeight: height } })
    .gif({ loop: 0, delay: Array(frames).fill(100) })
    .toFile(out)
  console.log(`${out} ${width}x${height} ${frames} ${fs.statSync(out).size}`)
}

async function probe (files) {
  for (const f of files) {
    try {
      const m = await sharp(f, { animated: true }).metadata()
      const h = m.pageHeight || m.height
      console.log(`${f}\t${m.format}\t${m.width}\t${h}\t${m.pages || 1}\t${m.chromaSubsampling || '-'}`)
    } catch {
      console.log(`${f}\terror\t0\t0\t0\t-`)
    }
  }
}

const [cmd, ...args] = process.argv.slice(2)
const run = cmd === 'gif'
  ? gif(args[0], args[1], Number(args[2] || 6), Number(args[3] || 1024))
  : cmd === 'probe'
    ? probe(args)
    : Promise.reject(new Error('usage: node tools.js gif SRC OUT [FRAMES] [WIDTH] | probe FILE...'))
run.catch((err) => {
  console.error(`tools.js: ${err.message}`)
  process.exit(1)
})
