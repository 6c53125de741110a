#!/usr/bin/env python3
"""SVG plot of imgedge's RSS over time during loadtest/flashcrowd.sh's crowd (stdlib only).

Input: the sampler's file, one line per 100 ms tick: `t_ms rss_kb health_status health_ms level`.
Draws RSS (MiB) against time (s), the kernel's peak (VmHWM) as a mark at the right, the budget line, the bypass/critical thresholds, the crowd
window shaded, the "crowd end + 30 s" mark with the recovery target, a strip of the /health
memory level per sample, and red ticks for unanswered /health probes (status 000).

  python3 loadtest/flashcrowd_plot.py --samples samples.txt --crowd-start MS --crowd-end MS \
      [--budget-mib 128] [--after-target-mib X] [--hwm-mib X] [--after-seconds 30] [--title T] --out plot.svg
"""

import argparse
import html
import math
import sys

# white outline behind labels drawn over the plot, so lines do not run through them
HALO = ' stroke="white" stroke-width="3" paint-order="stroke"'

LEVEL_COLOURS = {
    "normal": "#d9f0d3",
    "evicting": "#fff3b0",
    "warning": "#ffd580",
    "bypass": "#ffb060",
    "critical": "#f26b5b",
    "emergency": "#a50f15",
    "-": "#bbbbbb",
}


def read_samples(path):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 5:
                continue
            try:
                t_ms, rss_kb, status, health_ms = int(parts[0]), int(parts[1]), parts[2], float(parts[3])
            except ValueError:
                continue
            rows.append((t_ms, rss_kb, status, health_ms, parts[4]))
    rows.sort(key=lambda r: r[0])
    return rows


def nice_step(span, target_ticks):
    raw = span / max(target_ticks, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", required=True)
    ap.add_argument("--crowd-start", type=float, required=True, help="ms, same clock as the samples")
    ap.add_argument("--crowd-end", type=float, required=True, help="ms")
    ap.add_argument("--budget-mib", type=float, default=128.0)
    ap.add_argument("--after-target-mib", type=str, default="", help="40 MiB + tier bytes, in MiB")
    ap.add_argument("--after-seconds", type=float, default=30.0)
    ap.add_argument("--hwm-mib", type=str, default="", help="kernel VmHWM (peak RSS), drawn as a mark")
    ap.add_argument("--title", default="imgedge flash crowd: RSS over time")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    rows = read_samples(a.samples)
    if not rows:
        sys.exit("no samples in " + a.samples)
    try:
        after_target = float(a.after_target_mib)
    except ValueError:
        after_target = None

    W, H = 960, 520
    left, right, top, bottom = 70, 150, 50, 90
    pw, ph = W - left - right, H - top - bottom
    strip_y, strip_h = H - bottom + 34, 12

    t_min = 0.0
    t_max = max(rows[-1][0], a.crowd_end + a.after_seconds * 1000) / 1000.0
    rss_max = max(r[1] for r in rows) / 1024.0
    y_max = max(a.budget_mib * 1.08, rss_max * 1.05)
    y_step = 16 if y_max <= 256 else nice_step(y_max, 8)
    y_max = math.ceil(y_max / y_step) * y_step

    def x(t_s):
        return left + (t_s - t_min) / (t_max - t_min) * pw

    def y(mib):
        return top + ph - mib / y_max * ph

    out = []
    e = out.append
    e(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
      'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">')
    e(f'<rect width="{W}" height="{H}" fill="white"/>')
    e(f'<text x="{W / 2:.0f}" y="24" text-anchor="middle" font-size="15">{html.escape(a.title)}</text>')

    # crowd window and the +30 s mark
    cs, ce = a.crowd_start / 1000.0, a.crowd_end / 1000.0
    e(f'<rect x="{x(cs):.1f}" y="{top}" width="{x(ce) - x(cs):.1f}" height="{ph}" fill="#4a90d9" fill-opacity="0.13"/>')
    e(f'<text x="{(x(cs) + x(ce)) / 2:.1f}" y="{top + 16}" text-anchor="middle" fill="#2a5d9f">crowd ({ce - cs:.1f} s)</text>')
    ta = ce + a.after_seconds
    if ta <= t_max:
        e(f'<line x1="{x(ta):.1f}" y1="{top}" x2="{x(ta):.1f}" y2="{top + ph}" stroke="#555" stroke-dasharray="2,3"/>')
        e(f'<text x="{x(ta) - 4:.1f}" y="{top + 16}" text-anchor="end" fill="#555">end + {a.after_seconds:.0f} s</text>')

    # grid and axes
    v = 0.0
    while v <= y_max + 1e-9:
        e(f'<line x1="{left}" y1="{y(v):.1f}" x2="{left + pw}" y2="{y(v):.1f}" stroke="#e6e6e6"/>')
        e(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += y_step
    xs = nice_step(t_max - t_min, 12)
    t = 0.0
    while t <= t_max + 1e-9:
        e(f'<line x1="{x(t):.1f}" y1="{top + ph}" x2="{x(t):.1f}" y2="{top + ph + 4}" stroke="#333"/>')
        e(f'<text x="{x(t):.1f}" y="{top + ph + 17}" text-anchor="middle">{t:g}</text>')
        t += xs
    e(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    e(f'<text x="{left + pw / 2:.0f}" y="{top + ph + 31}" text-anchor="middle">time since sampling started (s)</text>')
    e(f'<text transform="translate(18 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle">RSS (MiB)</text>')

    # reference lines, labelled at the right
    refs = [
        (a.budget_mib, "#c0392b", "", f"budget {a.budget_mib:g} MiB"),
        (a.budget_mib * 0.9, "#e67e22", "6,4", "critical (0.90)"),
        (a.budget_mib * 0.8, "#f1c40f", "6,4", "bypass (0.80)"),
    ]
    try:
        hwm = float(a.hwm_mib)
    except ValueError:
        hwm = None
    if after_target is not None:
        refs.append((after_target, "#27ae60", "3,3", f"40 MiB + tier = {after_target:.1f}"))
    for val, colour, dash, label in refs:
        if val > y_max:
            continue
        d = f' stroke-dasharray="{dash}"' if dash else ""
        e(f'<line x1="{left}" y1="{y(val):.1f}" x2="{left + pw}" y2="{y(val):.1f}" stroke="{colour}" stroke-width="1.5"{d}/>')
        e(f'<text x="{left + pw + 6}" y="{y(val) + 4:.1f}" fill="{colour}">{html.escape(label)}</text>')

    # RSS line
    pts = " ".join(f"{x(r[0] / 1000.0):.1f},{y(r[1] / 1024.0):.1f}" for r in rows if r[1] > 0)
    e(f'<polyline points="{pts}" fill="none" stroke="#1f4e9a" stroke-width="1.6"/>')
    peak = max(rows, key=lambda r: r[1])
    px, py = x(peak[0] / 1000.0), y(peak[1] / 1024.0)
    e(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="#1f4e9a"/>')
    e(f'<text x="{px + 6:.1f}" y="{py - 6:.1f}" fill="#1f4e9a"{HALO}>sampled peak {peak[1] / 1024.0:.1f} MiB</text>')
    if hwm is not None and hwm <= y_max:
        e(f'<line x1="{left + pw - 12}" y1="{y(hwm):.1f}" x2="{left + pw}" y2="{y(hwm):.1f}" stroke="#1f4e9a" stroke-width="2.5"/>')
        e(f'<text x="{left + pw - 16}" y="{y(hwm) + 4:.1f}" text-anchor="end" fill="#1f4e9a" font-size="11"{HALO}>'
          f'kernel peak (VmHWM) {hwm:.1f} MiB</text>')

    # level strip and unanswered probes
    e(f'<text x="{left - 6}" y="{strip_y + 10}" text-anchor="end" font-size="10">level</text>')
    for i, r in enumerate(rows):
        t0 = r[0] / 1000.0
        t1 = rows[i + 1][0] / 1000.0 if i + 1 < len(rows) else t0 + 0.1
        colour = LEVEL_COLOURS.get(r[4], "#bbbbbb")
        e(f'<rect x="{x(t0):.1f}" y="{strip_y}" width="{max(x(t1) - x(t0), 0.5):.1f}" height="{strip_h}" fill="{colour}"/>')
        if r[2] == "000":
            e(f'<line x1="{x(t0):.1f}" y1="{top + ph - 8}" x2="{x(t0):.1f}" y2="{top + ph}" stroke="red" stroke-width="1.5"/>')
    seen = []
    for r in rows:
        if r[4] not in seen:
            seen.append(r[4])
    lx = left
    for lvl in seen:
        e(f'<rect x="{lx}" y="{strip_y + 20}" width="10" height="10" fill="{LEVEL_COLOURS.get(lvl, "#bbbbbb")}"/>')
        e(f'<text x="{lx + 14}" y="{strip_y + 29}" font-size="10">{html.escape(lvl)}</text>')
        lx += 20 + 7 * len(lvl) + 10
    fails = sum(1 for r in rows if r[2] == "000")
    e(f'<text x="{lx + 10}" y="{strip_y + 29}" font-size="10" fill="{"red" if fails else "#555"}">'
      f'/health unanswered: {fails} of {len(rows)} probes{" (red ticks)" if fails else ""}</text>')
    e("</svg>")

    with open(a.out, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
