#!/usr/bin/env python3
"""Writes the report of one loadtest/run.sh run: a Markdown file with the k6 results of every
target side by side and two PNG plots (RSS and latency over time).

Usage: python3 loadtest/lib/report.py RUN_DIR REPORT.md

RUN_DIR (made by run.sh) holds run.json ({scenario, command, started, targets, notes}) and under
targets/ one folder per target, in the order run, each with:
  meta.json    {name, base_url, k6_exit, origin_requests, process}
  k6.csv.gz    k6's CSV output (timestamps in unix milliseconds)
  summary.json k6's --summary-export (threshold results)
  samples.csv  loadtest/lib/sample.py's samples of the target's processes
Only requests tagged kind=load count (warm-ups and counter reads are kind=control). The plots are
written beside REPORT.md as <report>-rss.png and <report>-latency.png (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import sys
from collections import defaultdict


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return float("nan")
    return 60 * sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def interp(samples: list[dict], t: float, key: str) -> float:
    """The sampled value of `key` at unix time t, linearly interpolated (clamped at the ends)."""
    if t <= samples[0]["t"]:
        return samples[0][key]
    for a, b in zip(samples, samples[1:]):
        if a["t"] <= t <= b["t"]:
            f = (t - a["t"]) / (b["t"] - a["t"]) if b["t"] > a["t"] else 0
            return a[key] + f * (b[key] - a[key])
    return samples[-1][key]


def load_target(d: str) -> dict:
    meta = json.load(open(os.path.join(d, "meta.json")))
    durations, waiting, starts, ends = [], [], [], []
    per_sec: dict[int, list[float]] = defaultdict(list)
    failed = checks_pass = checks_fail = 0
    received = 0.0
    rows = []
    path = os.path.join(d, "k6.csv.gz")
    if os.path.exists(path):
        with gzip.open(path, "rt", newline="") as f:
            for r in csv.DictReader(f):
                if r["metric_name"] == "data_received":
                    # per iteration, tagged with the scenario only: setup() and teardown() have none
                    if r.get("scenario") and not (r.get("group") or "").startswith(("::setup", "::teardown")):
                        received += float(r["metric_value"])
                    continue
                if "kind=load" not in (r.get("extra_tags") or ""):
                    continue
                rows.append(r)
    for r in rows:
        name, ts, v = r["metric_name"], int(r["timestamp"]), float(r["metric_value"])
        if name == "http_req_duration":
            durations.append(v)
            starts.append(ts - v)
            ends.append(ts)
            rows_sec = ts
            per_sec[rows_sec // 1000].append(v)
        elif name == "http_req_waiting":
            waiting.append(v)
        elif name == "http_req_failed":
            failed += v > 0
        elif name == "checks":
            if v > 0:
                checks_pass += 1
            else:
                checks_fail += 1
    samples = []
    sp = os.path.join(d, "samples.csv")
    if os.path.exists(sp):
        with open(sp, newline="") as f:
            for r in csv.DictReader(f):
                samples.append({"t": float(r["unix_s"]), "rss": int(r["rss_bytes"]), "cpu": float(r["cpu_s"]),
                                "fds": int(r["fds"])})
    t0 = min(starts) / 1000 if starts else None
    t1 = max(ends) / 1000 if ends else None
    out = {"meta": meta, "n": len(durations), "failed": failed, "checks_pass": checks_pass,
           "checks_fail": checks_fail, "received": received, "t0": t0, "t1": t1, "samples": samples,
           "per_sec": per_sec}
    durations.sort()
    waiting.sort()
    out["lat"] = {p: pct(durations, p) for p in (50, 95, 99)}
    out["lat"]["max"] = durations[-1] if durations else float("nan")
    out["ttfb"] = {p: pct(waiting, p) for p in (50, 99)}
    window = (t1 - t0) if t0 is not None and t1 is not None else 0
    out["window"] = window
    out["rps"] = len(durations) / window if window > 0 else float("nan")
    if samples and window > 0:
        in_run = [s for s in samples if t0 - 1 <= s["t"] <= t1 + 1] or samples
        out["peak_rss"] = max(s["rss"] for s in in_run)
        # the first and last samples taken while load requests ran (a warm-up just before t0
        # can fill a cache between two samples: interpolating would invent a value)
        during = [s for s in samples if t0 <= s["t"] <= t1] or in_run
        out["start_rss"] = during[0]["rss"]
        out["end_rss"] = during[-1]["rss"]
        out["peak_fds"] = max(s["fds"] for s in in_run)
        cpu = interp(samples, t1, "cpu") - interp(samples, t0, "cpu")
        out["cpu_s"] = cpu
        out["cpu_us_per_req"] = 1e6 * cpu / len(durations) if durations else float("nan")
        out["cores"] = cpu / window
    summary = {}
    sj = os.path.join(d, "summary.json")
    if os.path.exists(sj):
        try:
            summary = json.load(open(sj))
        except ValueError:
            summary = {}
    crossed = []
    for metric, m in (summary.get("metrics") or {}).items():
        for expr, failed_it in (m.get("thresholds") or {}).items():
            if failed_it:
                crossed.append(f"{metric} {expr}")
    out["crossed"] = crossed
    # soak figures: slopes over the last 8 minutes, p99 of the second minute and of the last
    if samples and window > 0:
        last8 = [s for s in samples if t1 - 480 <= s["t"] <= t1 and s["t"] >= t0]
        out["rss_slope"] = slope_per_min([(s["t"], s["rss"] / 1048576) for s in last8])
        out["fds_slope"] = slope_per_min([(s["t"], s["fds"]) for s in last8])
        out["slope_span"] = (last8[-1]["t"] - last8[0]["t"]) if len(last8) > 1 else 0

        def p99_between(a: float, b: float) -> float:
            vals = sorted(v for sec, vs in per_sec.items() if a <= sec < b for v in vs)
            return pct(vals, 99)

        out["p99_min2"] = p99_between(t0 + 60, t0 + 120)
        out["p99_last"] = p99_between(t1 - 60, t1 + 1)
    return out


def fmt(v: float, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.{digits}f}".replace(",", " ")


def plot(targets: list[dict], base: str, scenario: str) -> tuple[str | None, str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, None
    rss_png, lat_png = base + "-rss.png", base + "-latency.png"
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    for t in targets:
        if not t["samples"] or t["t0"] is None:
            continue
        xs = [s["t"] - t["t0"] for s in t["samples"]]
        ax.plot(xs, [s["rss"] / 1048576 for s in t["samples"]], label=t["meta"]["name"])
    ax.set_xlabel("seconds since the target's first load request")
    ax.set_ylabel("RSS, MiB (process tree)")
    ax.set_title(f"{scenario}: resident memory")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(rss_png)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    for i, t in enumerate(targets):
        if not t["per_sec"] or t["t0"] is None:
            continue
        secs = sorted(t["per_sec"])
        xs = [s - t["t0"] for s in secs]
        color = f"C{i}"
        ax.plot(xs, [pct(sorted(t["per_sec"][s]), 99) for s in secs], color=color,
                label=f"{t['meta']['name']} p99")
        ax.plot(xs, [pct(sorted(t["per_sec"][s]), 50) for s in secs], color=color, linestyle="--",
                label=f"{t['meta']['name']} p50")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the target's first load request")
    ax.set_ylabel("request duration, ms (per second)")
    ax.set_title(f"{scenario}: latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(lat_png)
    plt.close(fig)
    return rss_png, lat_png


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir, report = sys.argv[1], sys.argv[2]
    run = json.load(open(os.path.join(run_dir, "run.json")))
    targets = [load_target(os.path.join(run_dir, "targets", n)) for n in run["targets"]]
    scenario = run["scenario"]
    base = report[:-3] if report.endswith(".md") else report
    rss_png, lat_png = plot(targets, base, scenario)
    names = [t["meta"]["name"] for t in targets]
    L = [f"# {scenario}: {' vs '.join(names)}", ""]
    L.append(f"Run {run['started']} on {run['machine']}. {run['description']}")
    L.append("")
    L.append("```sh")
    L.append(run["command"])
    L.append("```")
    L.append("")
    for n in run.get("notes", []):
        L.append(f"- {n}")
    L.append("")
    head = "| | " + " | ".join(names) + " |"
    L += [head, "|---" * (len(names) + 1) + "|"]

    def row(label: str, f) -> None:
        L.append(f"| {label} | " + " | ".join(f(t) for t in targets) + " |")

    row("k6 result", lambda t: "pass" if t["meta"]["k6_exit"] == 0 else
        ("thresholds crossed" if t["meta"]["k6_exit"] == 99 else f"exit {t['meta']['k6_exit']}"))
    row("requests", lambda t: str(t["n"]))
    row("requests/s", lambda t: fmt(t["rps"]))
    row("MB/s received", lambda t: fmt(t["received"] / 1e6 / t["window"]) if t["window"] else "–")
    row("p50 ms", lambda t: fmt(t["lat"][50], 2))
    row("p95 ms", lambda t: fmt(t["lat"][95], 2))
    row("p99 ms", lambda t: fmt(t["lat"][99], 2))
    row("max ms", lambda t: fmt(t["lat"]["max"], 2))
    row("time to first byte p50 / p99 ms", lambda t: f"{fmt(t['ttfb'][50], 2)} / {fmt(t['ttfb'][99], 2)}")
    row("failed requests", lambda t: str(t["failed"]))
    row("checks passed", lambda t: f"{t['checks_pass']} of {t['checks_pass'] + t['checks_fail']}")
    row("origin requests", lambda t: str(t["meta"].get("origin_requests", "–")))
    row("peak RSS MiB", lambda t: fmt(t.get("peak_rss", float("nan")) / 1048576))
    row("RSS, first / last sample under load, MiB", lambda t: f"{fmt(t.get('start_rss', float('nan')) / 1048576)} / "
        f"{fmt(t.get('end_rss', float('nan')) / 1048576)}")
    row("CPU per request µs", lambda t: fmt(t.get("cpu_us_per_req", float("nan")), 0))
    row("CPU cores busy", lambda t: fmt(t.get("cores", float("nan")), 2))
    row("open fds, peak", lambda t: str(t.get("peak_fds", "–")))
    if scenario == "soak":
        row("RSS slope, last 8 min, MiB/min", lambda t: fmt(t.get("rss_slope", float("nan")), 3))
        row("fd slope, last 8 min, fds/min", lambda t: fmt(t.get("fds_slope", float("nan")), 3))
        row("p99 ms, 2nd minute → last minute", lambda t: f"{fmt(t.get('p99_min2', float('nan')), 2)} → "
            f"{fmt(t.get('p99_last', float('nan')), 2)}")
        row("last ÷ 2nd minute p99", lambda t: fmt(t.get("p99_last", float("nan")) / t.get("p99_min2", float("nan")), 2)
            if t.get("p99_min2") else "–")
    row("thresholds crossed", lambda t: "<br>".join(t["crossed"]) or "none")
    L.append("")
    L.append("Requests, latency, failures and checks count load requests only (not warm-ups or counter "
             "reads), from k6's CSV output. Memory, CPU and file descriptors are of the target's whole "
             "process tree (nginx's master and workers, Varnish's manager and child), as sampled; CPU per request is the CPU time between the first and last load request divided "
             "by their number. k6 runs on the same two cores, so throughput is bounded by it as much "
             "as by the target; compare targets within one report.")
    if "nginx" in names:
        L.append("")
        L.append("nginx's proxy_cache keeps objects in files: they live in the kernel's page cache, "
                 "which is not in its RSS (imgedge's memory tier and Varnish's malloc storage are).")
    L.append("")
    if rss_png:
        L.append(f"![RSS over time]({os.path.basename(rss_png)})")
        L.append("")
        L.append(f"![Latency over time]({os.path.basename(lat_png)})")
        L.append("")
    with open(report, "w") as f:
        f.write("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
