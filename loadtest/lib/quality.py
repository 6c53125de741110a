#!/usr/bin/env python3
"""Output quality of loadtest/sharp.sh's thumbnails: SSIM against the source.

    python3 loadtest/lib/quality.py SOURCES_DIR OUT_DIR NAME...

For each NAME (a file in SOURCES_DIR) and each output OUT_DIR/NAME.<imgedge|sharp>.<jpeg|webp>,
the output is compared with a reference made from the source: decoded by Pillow, EXIF
orientation applied, resized to the output's size with Pillow's Lanczos filter, both as luma
(ITU-R 601, Pillow's "L"). SSIM is scikit-image's structural_similarity with the parameters of
Wang et al. 2004 (Gaussian window, sigma 1.5, no sample covariance, data range 255): the same
reference for both targets, so neither's resize is favoured by construction. Prints a Markdown
table (SSIM of each, imgedge minus sharp) and the mean difference per format; an output that is
missing or does not decode is a dash. Exits 0 whatever the figures: the report says them.

Needs Pillow and scikit-image (sharp.sh installs them into a virtual environment of its own).
"""

import os
import sys

import numpy as np
from PIL import Image, ImageOps
from skimage.metrics import structural_similarity

TARGETS = ("imgedge", "sharp")
FORMATS = ("jpeg", "webp")


def luma(image):
    """The image as a float array of luma, alpha composed onto white first."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("L"), dtype=np.float64)


def reference(source_path, size):
    """The source, oriented, resized to `size` with Lanczos, as luma."""
    with Image.open(source_path) as source:
        source.seek(0)
        oriented = ImageOps.exif_transpose(source.convert("RGBA") if source.mode == "P" else source)
        return luma(oriented.resize(size, Image.Resampling.LANCZOS))


def ssim(output_path, source_path):
    """SSIM of the output against its reference; None when the output is missing or broken."""
    if not os.path.exists(output_path):
        return None
    try:
        with Image.open(output_path) as output:
            output.seek(0)
            out = luma(output)
            size = output.size
    except OSError:
        return None
    ref = reference(source_path, size)
    return structural_similarity(
        ref, out, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )


def cell(value):
    return "—" if value is None else f"{value:.4f}"


def main(argv):
    if len(argv) < 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    sources, outputs, names = argv[1], argv[2], argv[3:]
    print("| image | JPEG imgedge | JPEG sharp | Δ | WebP imgedge | WebP sharp | Δ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    diffs = {fmt: [] for fmt in FORMATS}
    for name in names:
        row = [name]
        for fmt in FORMATS:
            got = {
                t: ssim(os.path.join(outputs, f"{name}.{t}.{fmt}"), os.path.join(sources, name))
                for t in TARGETS
            }
            row += [cell(got["imgedge"]), cell(got["sharp"])]
            if None in got.values():
                row.append("—")
            else:
                d = got["imgedge"] - got["sharp"]
                diffs[fmt].append(d)
                row.append(f"{d:+.4f}")
        print("| " + " | ".join(row) + " |")
    print()
    for fmt in FORMATS:
        d = diffs[fmt]
        if d:
            print(
                f"- {fmt.upper()}: imgedge minus sharp, mean {np.mean(d):+.4f}, "
                f"worst {min(d):+.4f} over {len(d)} images"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
