#!/usr/bin/env python3
"""The Python half of tests/operator/run.sh (stdlib only). Three commands:

  check.py dashboard DASHBOARD.json
      Validates the Grafana dashboard: it parses; it has a `datasource` variable of type
      datasource (Prometheus) and an `instance` variable; every panel but a row has at least one
      query and no target is empty; every datasource the dashboard names, on a panel, a target or
      a variable, is that variable (`${datasource}`), the built-in annotation source aside; panel
      ids are unique and every panel has a gridPos. Prints `dashboard: N panels, M queries`.

  check.py coverage RULES.yml TESTS.yml
      Every alert of RULES.yml has, in TESTS.yml (promtool's unit tests), a case where it fires
      (exp_alerts not empty) and one where it must not (exp_alerts: []). Line-based: it reads
      `- alert: NAME`, `alertname: NAME` and `exp_alerts` lines as these two files write them.

  check.py load --a URL --b URL --c URL --origin URL [--seconds S]
      Drives a short load (default 10 s, every loop bounded in count and time) at three imgedge
      instances that share one Redis: A (disk and shared tiers, rate limited per client, clients
      named by X-Forwarded-For), B (shared tier only: its misses are shared-tier hits of what A
      stored) and C (a memory budget below its RSS: it sheds). Misses and hits through both
      routes, concurrent misses of one slow object (collapsed), renders (transforms, then hits),
      a 404, bad requests (400), a render of a file that is not an image (502), a burst from one
      client past its rate (429). Prints what it got per status.

  check.py query --prometheus URL --dashboard DASHBOARD.json [--instance REGEX]
      Evaluates every target of every panel (and the `instance` variable's query) through
      Prometheus's /api/v1/query, with Grafana's variables substituted ($__rate_interval -> 1m,
      $instance -> REGEX, default .*), and fails naming each panel whose query returns no series
      or an error. Then checks every rule Prometheus loaded (/api/v1/rules): evaluated without
      error, and its expression evaluates through /api/v1/query (it may return nothing). Prints
      `panels: N checked, M without series` and `rules: N evaluated`; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

DS_VARIABLE = {"type": "prometheus", "uid": "${datasource}"}
DS_ALLOWED = ({"type": "prometheus", "uid": "${datasource}"}, {"type": "prometheus", "uid": "$datasource"},
              "${datasource}", "$datasource")
ANNOTATION_DS = {"type": "grafana", "uid": "-- Grafana --"}


# ---- dashboard ------------------------------------------------------------------------------------

def all_panels(dash: dict) -> list[dict]:
    """Every panel, the ones inside collapsed rows included."""
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []) if p.get("type") == "row" else [])
    return out


def queried_panels(dash: dict) -> list[dict]:
    return [p for p in all_panels(dash) if p.get("type") != "row"]


def datasources(node, path="$"):
    """(path, value) of every `datasource` key anywhere in node."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                yield f"{path}.{k}", v
            yield from datasources(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from datasources(v, f"{path}[{i}]")


def check_dashboard(file: str) -> int:
    problems = []
    try:
        with open(file, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        print(f"dashboard: {file} does not parse: {e}")
        return 1
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource with query prometheus")
    inst = variables.get("instance")
    if not inst or inst.get("type") != "query" or "instance" not in json.dumps(inst.get("query")):
        problems.append("no `instance` query variable")
    if not dash.get("title") or not dash.get("uid"):
        problems.append("no title or uid")
    if not any(p.get("type") == "row" for p in all_panels(dash)):
        problems.append("no rows")
    for where, value in datasources(dash):
        if value in DS_ALLOWED:
            continue
        if value == ANNOTATION_DS and where.startswith("$.annotations"):
            continue
        problems.append(f"{where} names the datasource {json.dumps(value)}, not the variable ${{datasource}}")
    ids = Counter(p.get("id") for p in all_panels(dash))
    problems += [f"panel id {i} is used {n} times" for i, n in ids.items() if n > 1]
    queries = 0
    for p in queried_panels(dash):
        title = p.get("title") or f"panel {p.get('id')}"
        if not p.get("gridPos"):
            problems.append(f"{title!r}: no gridPos")
        if p.get("datasource") not in DS_ALLOWED:
            problems.append(f"{title!r}: its datasource is not the variable")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{title!r}: no query")
        for t in targets:
            if not (t.get("expr") or "").strip():
                problems.append(f"{title!r}: target {t.get('refId')} has no expr")
            queries += 1
    for line in problems:
        print(f"dashboard: {line}")
    print(f"dashboard: {len(queried_panels(dash))} panels, {queries} queries"
          + (f", {len(problems)} problems" if problems else ", valid"))
    return 1 if problems else 0


# ---- rule coverage -------------------------------------------------------------------------------

def check_coverage(rules_file: str, tests_file: str) -> int:
    import re
    with open(rules_file, encoding="utf-8") as f:
        alerts = re.findall(r"^\s*- alert:\s*(\S+)\s*$", f.read(), re.M)
    fires: Counter[str] = Counter()
    quiet: Counter[str] = Counter()
    name = None
    with open(tests_file, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^\s*alertname:\s*(\S+)\s*$", line)
            if m:
                name = m.group(1)
            elif name and re.match(r"^\s*exp_alerts:\s*\[\]\s*$", line):
                quiet[name] += 1
                name = None
            elif name and re.match(r"^\s*- exp_labels:", line):
                fires[name] += 1
                name = None
    problems = [f"{a}: no test where it fires" for a in alerts if not fires[a]]
    problems += [f"{a}: no test where it must not fire" for a in alerts if not quiet[a]]
    problems += [f"{a}: tested but not an alert of {rules_file}" for a in sorted(set(fires) | set(quiet)) if a not in alerts]
    for line in problems:
        print(f"coverage: {line}")
    print(f"coverage: {len(alerts)} alerts, each with a firing and a quiet case" if not problems
          else f"coverage: {len(problems)} problems")
    return 1 if problems else 0


# ---- load -----------------------------------------------------------------------------------------

class Client:
    """One keep-alive connection to an imgedge; every request bounded by a timeout."""

    def __init__(self, base: str, timeout: float = 10.0):
        u = urllib.parse.urlsplit(base)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.conn = None

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", path, headers=headers or {})
                r = self.conn.getresponse()
                body = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, {k.lower(): v for k, v in r.getheaders()}, body
            except (OSError, http.client.HTTPException):
                if self.conn:
                    self.conn.close()
                self.conn = None
                if attempt:
                    return 0, {}, b""
        return 0, {}, b""


def manifest_names(origin: str) -> list[str]:
    # the origin serves its folder's files by name, MANIFEST.tsv included
    with urllib.request.urlopen(origin + "/MANIFEST.tsv", timeout=10) as r:
        return [line.split("\t")[0] for line in r.read().decode().splitlines() if line.strip()]


def load(args) -> int:
    names = manifest_names(args.origin)
    images = [n for n in names if n.endswith(".png")]
    small = [n for n in images if not n.startswith("noise")]
    big = next(n for n in images if n.startswith("noise"))
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds
    rng = random.Random(7)

    def note(label: str, status: int):
        with lock:
            statuses[f"{label} {status}"] += 1

    def xff(i: int) -> dict:
        # one of 200 clients (TEST-NET-2 addresses, only ever a header value), each under A's
        # limit of 50 a second
        return {"X-Forwarded-For": f"198.51.100.{i % 200 + 1}"}

    a = Client(args.a)
    obj = "/storage/v1/object/public/b/"
    render = "/storage/v1/render/image/public/b/"
    proxy = "/image-proxy?url=" + urllib.parse.quote(args.origin + "/", safe="")

    # 1. Concurrent cold misses of one slow object: one fetch, the rest collapsed followers.
    def cold(i: int):
        s, _, _ = Client(args.a).get(obj + big, xff(i))
        note("collapse", s)
    threads = [threading.Thread(target=cold, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    # 2. Misses, then hits, through both routes; renders twice (a transform, then a hit).
    n = 0
    for name in small:
        for path in (obj + name, proxy + urllib.parse.quote(name)):
            for _ in range(2):
                note("object", a.get(path, xff(n))[0])
                n += 1
        for _ in range(2):
            note("render", a.get(render + name + "?width=50", xff(n))[0])
            n += 1
    # concurrent requests for one new rendition share one transform
    def rendition(i: int):
        s, _, _ = Client(args.a).get(render + big + "?width=64", xff(i))
        note("render", s)
    threads = [threading.Thread(target=rendition, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    # 3. Errors: a 404, bad requests, a render of a file that is not an image, a greedy client.
    note("404", a.get(obj + "missing.png", xff(1))[0])
    note("bad url", a.get("/image-proxy?url=not-a-url", xff(2))[0])
    note("bad width", a.get(render + small[0] + "?width=abc", xff(3))[0])
    note("not an image", a.get(render + "notes.txt?width=50", xff(4))[0])
    for _ in range(120):
        note("greedy", a.get(obj + small[0], {"X-Forwarded-For": "203.0.113.9"})[0])

    # 4. The shared tier: B has nothing in memory; A's objects are in Redis.
    b = Client(args.b)
    time.sleep(0.5)  # A's shared-tier writes are queued after each fill
    for name in images:
        note("shared", b.get(obj + name)[0])
        note("shared render", b.get(render + name + "?width=50")[0])

    # 5. C sheds: its budget is below its RSS.
    c = Client(args.c)
    for name in small:
        note("pressured", c.get(obj + name)[0])

    # 6. Hits until the time is up: at most 10 000 requests, about 500 a second (this is a
    # test of the metrics, not a benchmark: the machine's cores are left to others).
    for i in range(10000):
        if time.monotonic() > deadline:
            break
        time.sleep(0.001)
        name = rng.choice(small)
        path = rng.choice((obj + name, proxy + urllib.parse.quote(name), render + name + "?width=50"))
        note("hits", a.get(path, xff(i))[0])
        if i % 50 == 0:
            note("shared hits", b.get(obj + rng.choice(images))[0])
    for k in sorted(statuses):
        print(f"load: {k}: {statuses[k]}")
    failed = statuses.get("hits 0", 0) + statuses.get("object 0", 0)
    return 1 if failed else 0


# ---- query ----------------------------------------------------------------------------------------

def prom_get(base: str, path: str, params: dict | None = None) -> dict:
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400/422: a query that does not parse or evaluate
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "error": f"HTTP {e.code}"}


def substitute(expr: str, instance: str) -> str:
    for var, value in (("$__rate_interval", "1m"), ("${__rate_interval}", "1m"), ("$__interval", "15s"),
                       ("${__interval}", "15s"), ("$__range", "5m"), ("${__range}", "5m"),
                       ("${instance:regex}", instance), ("${instance}", instance), ("$instance", instance)):
        expr = expr.replace(var, value)
    return expr


def variable_query(q: str) -> str:
    """A Grafana Prometheus variable query as PromQL: label_values(metric, label) -> group by."""
    q = q.strip()
    if q.startswith("label_values(") and q.endswith(")"):
        inner = q[len("label_values("):-1]
        metric, _, label = inner.rpartition(",")
        return f"group by ({label.strip()}) ({metric.strip()})" if metric else f"group by ({label.strip()}) ({{{label.strip()}!=\"\"}})"
    if q.startswith("query_result(") and q.endswith(")"):
        return q[len("query_result("):-1]
    return q


def query(args) -> int:
    with open(args.dashboard, encoding="utf-8") as f:
        dash = json.load(f)
    failures = []
    empty = []
    checked = 0
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        r = prom_get(args.prometheus, "/api/v1/query", {"query": variable_query(substitute(q, args.instance))})
        if r.get("status") != "success" or not r["data"]["result"]:
            failures.append(f"variable ${v.get('name')}: {q}: {r.get('error') or 'no series'}")
    for p in queried_panels(dash):
        title = p.get("title") or f"panel {p.get('id')}"
        checked += 1
        panel_empty = []
        for t in p.get("targets", []):
            expr = substitute(t.get("expr", ""), args.instance)
            r = prom_get(args.prometheus, "/api/v1/query", {"query": expr})
            if r.get("status") != "success":
                failures.append(f"panel {title!r} target {t.get('refId')}: error {r.get('error')}: {expr}")
            elif not r["data"]["result"]:
                panel_empty.append(f"{t.get('refId')}: {expr}")
            elif args.verbose:
                print(f"  {title} {t.get('refId')}: {len(r['data']['result'])} series")
        if panel_empty:
            empty.append(title)
            for e in panel_empty:
                failures.append(f"panel {title!r}: no series from {e}")
    print(f"panels: {checked} checked, {len(empty)} without series" + (": " + "; ".join(empty) if empty else ""))

    rules = prom_get(args.prometheus, "/api/v1/rules")
    n_rules = 0
    firing = []
    if rules.get("status") != "success":
        failures.append(f"/api/v1/rules: {rules.get('error')}")
    else:
        for g in rules["data"]["groups"]:
            for rule in g["rules"]:
                n_rules += 1
                name = rule.get("name")
                if rule.get("health") != "ok":
                    failures.append(f"rule {name}: health {rule.get('health')}: {rule.get('lastError')}")
                r = prom_get(args.prometheus, "/api/v1/query", {"query": rule["query"]})
                if r.get("status") != "success":
                    failures.append(f"rule {name}: error {r.get('error')}: {rule['query']}")
                elif r["data"]["result"]:
                    firing.append(f"{name} ({len(r['data']['result'])})")
        if n_rules == 0:
            failures.append("Prometheus loaded no rules")
    print(f"rules: {n_rules} evaluated without error by Prometheus and through /api/v1/query; "
          f"{len(firing)} with series now" + (": " + ", ".join(firing) if firing else ""))
    for f in failures:
        print(f"FAIL {f}")
    print(f"panel_count={checked} rule_count={n_rules}")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dashboard")
    d.add_argument("file")
    lo = sub.add_parser("load")
    for k in ("a", "b", "c", "origin"):
        lo.add_argument("--" + k, required=True)
    lo.add_argument("--seconds", type=float, default=10.0)
    c = sub.add_parser("coverage")
    c.add_argument("rules")
    c.add_argument("tests")
    q = sub.add_parser("query")
    q.add_argument("--prometheus", required=True)
    q.add_argument("--dashboard", required=True)
    q.add_argument("--instance", default=".*")
    q.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.cmd == "dashboard":
        return check_dashboard(args.file)
    if args.cmd == "coverage":
        return check_coverage(args.rules, args.tests)
    if args.cmd == "load":
        return load(args)
    return query(args)


if __name__ == "__main__":
    sys.exit(main())
