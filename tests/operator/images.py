#!/usr/bin/env python3
"""Writes a small image folder for operator tests and benchmarks (Python stdlib only).

Usage: python3 tests/operator/images.py DIR

Writes a few RGB PNGs made with zlib and struct (gradients, and one of noise that does not
compress: about 300 KB, so that a paced origin takes a while to send it and concurrent misses
collapse onto one fetch), a file that is not an image (`notes.txt`, for a render that fails),
and DIR/MANIFEST.tsv in loadtest/origin.py's format: name, bytes, content type, sha256. The
content is fixed (the noise comes from a seeded generator), so the files are the same on every
run. Their modification time is set a year back: an old file is heuristically fresh.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import sys
import time
import zlib


def png(width: int, height: int, pixel) -> bytes:
    """An 8-bit RGB PNG whose pixel (x, y) is pixel(x, y) -> (r, g, b)."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter type: none
        for x in range(width):
            rows.extend(pixel(x, y))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(rows), 9)) + chunk(b"IEND", b"")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20261206)
    noise = bytes(rng.getrandbits(8) for _ in range(320 * 320 * 3))
    files: dict[str, tuple[bytes, str]] = {
        "gradient-64.png": (png(64, 64, lambda x, y: (x * 4, y * 4, 128)), "image/png"),
        "gradient-200x150.png": (png(200, 150, lambda x, y: (x, y, (x + y) % 256)), "image/png"),
        "stripes-320x240.png": (png(320, 240, lambda x, y: ((x // 8 % 2) * 255, 64, y)), "image/png"),
        "checker-128.png": (png(128, 128, lambda x, y: (255, 255, 255) if (x // 16 + y // 16) % 2 else (20, 40, 60)), "image/png"),
        "dots-96.png": (png(96, 96, lambda x, y: (200, 30, 30) if (x % 12 < 4 and y % 12 < 4) else (240, 240, 200)), "image/png"),
        "noise-320.png": (png(320, 320, lambda x, y: noise[(y * 320 + x) * 3:(y * 320 + x) * 3 + 3]), "image/png"),
        "notes.txt": (b"not an image\n" * 8, "text/plain"),
    }
    old = time.time() - 365 * 86400
    lines = []
    for name, (body, ctype) in files.items():
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(body)
        os.utime(path, (old, old))
        lines.append(f"{name}\t{len(body)}\t{ctype}\t{hashlib.sha256(body).hexdigest()}\n")
    with open(os.path.join(out, "MANIFEST.tsv"), "w", encoding="utf-8") as f:
        f.writelines(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
