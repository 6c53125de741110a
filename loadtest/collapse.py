#!/usr/bin/env python3
"""Collapsed-forwarding probe: many clients, one cold URL, all at once (Python 3.11 stdlib only).

Usage:
  python3 loadtest/collapse.py --url URL --clients 200 --sha256 HEX --bytes N
                               [--timeout 120] [--connect-timeout 10] [--rcvlowat 131072]
                               [--details FILE]

Opens --clients TCP connections (one per client, plain HTTP/1.1, `Connection: close`) and only
when every one is established writes the same GET to all of them in one tight loop, so the
requests leave as close together as the event loop allows. For each client it records, from the
moment its request was written (`t0`):

  head_ms         the complete response head has been read
  first_byte_ms   the first bytes after the head have been read (the first body byte; for a
                  chunked response the first chunk-size line, which arrives with its data)
  total_ms        the body is complete (Content-Length reached, last chunk, or EOF)

Times are arrival times: each connection's StreamReader notes when the event loop fed it each
piece read from the kernel, and the head end / first body byte / last byte are dated by the piece
that carried them. So a client whose coroutine runs late (the loop is busy hashing other
clients' bodies) is not charged for that; how late they ran is reported as client_lag_ms
(coroutine time minus arrival time of the first body byte), a gauge of this tool's own overhead.
To keep that overhead down, a client that has its first body byte sets SO_RCVLOWAT (--rcvlowat,
Linux) so the rest wakes it per 128 KiB instead of per small piece; total_ms is then dated by the
piece that completed the body (the last 256 KiB are read without it).

Also recorded: status, Cache-Status and X-Cache headers, body size and sha256 (both must equal
--bytes and --sha256; the status must be 200). Prints one JSON line:

  clients, ok, errors, mismatches, error_samples, send_spread_ms (first to last request written),
  status, cache_status and x_cache (counts per value),
  followers / others / all: {n, head_ms, first_byte_ms, total_ms, client_lag_ms},
  each {median, p90, max}
  (followers = Cache-Status contains "collapsed"; others = the rest of the completed clients).

Exit status 0 when every client got a byte-exact 200, 1 on any error or mismatch, 2 on bad
arguments. An overall --timeout (default 120 s) bounds the whole run; clients not done by then
count as errors. --details FILE writes one JSON object per client (the fields above, plus
`pieces`: how many reads its response took).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import socket
import statistics
import sys
import time
from urllib.parse import urlsplit

READ = 256 * 1024
MAX_HEAD = 64 * 1024
MARKS = 64  # arrival marks kept per connection: enough to cover the head and the first body bytes
RCVLOWAT = 128 * 1024  # --rcvlowat default


class TimedReader(asyncio.StreamReader):
    """A StreamReader that remembers when data arrived (fed by the transport), by byte offset."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop):
        super().__init__(limit=limit, loop=loop)
        self.fed = 0
        self.pieces = 0
        self.marks: list[tuple[int, float]] = []  # (offset just past the piece, arrival time)
        self.last_arrival: float | None = None

    def feed_data(self, data: bytes) -> None:
        t = time.perf_counter()
        super().feed_data(data)
        self.fed += len(data)
        self.pieces += 1
        self.last_arrival = t
        if len(self.marks) < MARKS:
            self.marks.append((self.fed, t))

    def arrival(self, offset: int) -> float | None:
        """When the byte at `offset` (0-based, from the start of the response) arrived."""
        for end, t in self.marks:
            if end > offset:
                return t
        return None


class Client:
    __slots__ = (
        "idx", "reader", "writer", "t0", "t_head", "t_first", "t_last", "t_first_seen", "body_start",
        "sock", "status",
        "cache_status", "x_cache", "size", "sha256", "error", "mismatch",
    )

    def __init__(self, idx: int):
        self.idx = idx
        self.reader: TimedReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.t0 = self.t_head = self.t_first = self.t_last = self.t_first_seen = None
        self.body_start = 0  # offset of the first body byte in the response
        self.sock: socket.socket | None = None
        self.status: int | None = None
        self.cache_status: str | None = None
        self.x_cache: str | None = None
        self.size = 0
        self.sha256: str | None = None
        self.error: str | None = None
        self.mismatch: str | None = None

    def ms(self, t: float | None) -> float | None:
        return None if t is None or self.t0 is None else (t - self.t0) * 1000.0

    def record(self) -> dict:
        return {
            "client": self.idx, "status": self.status, "cache_status": self.cache_status,
            "x_cache": self.x_cache, "bytes": self.size, "sha256": self.sha256,
            "head_ms": rnd(self.ms(self.t_head)), "first_byte_ms": rnd(self.ms(self.t_first)),
            "total_ms": rnd(self.ms(self.t_last)), "client_lag_ms": rnd(self.lag()),
            "pieces": self.reader.pieces if self.reader else None,
            "error": self.error, "mismatch": self.mismatch,
        }

    def mark_first(self) -> None:
        """Called by the coroutine when it first sees body bytes."""
        if self.t_first is None:
            now = time.perf_counter()
            self.t_first_seen = now
            self.t_first = self.reader.arrival(self.body_start) or now

    def set_lowat(self, n: int) -> None:
        """SO_RCVLOWAT: wake this reader only once n bytes are queued (or at EOF). Best effort."""
        if self.sock is not None and hasattr(socket, "SO_RCVLOWAT"):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            except OSError:
                pass

    def lag(self) -> float | None:
        if self.t_first is None or self.t_first_seen is None:
            return None
        return (self.t_first_seen - self.t_first) * 1000.0


def rnd(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    v = sorted(values)
    p90 = v[max(0, math.ceil(0.9 * len(v)) - 1)]  # nearest rank
    return {"median": rnd(statistics.median(v)), "p90": rnd(p90), "max": rnd(v[-1])}


class ProtocolError(Exception):
    pass


async def read_head(c: Client) -> tuple[int, dict[str, str], bytes]:
    """Reads until the end of the head. Returns (status, headers lower-cased, leftover bytes)."""
    buf = b""
    while True:
        data = await c.reader.read(READ)
        now = time.perf_counter()
        if not data:
            raise ProtocolError(f"connection closed before the response head ({len(buf)} bytes)")
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            c.t_head = c.reader.arrival(end + 3) or now
            break
        if len(buf) > MAX_HEAD:
            raise ProtocolError("response head too large")
    head, rest = buf[:end].decode("latin-1"), buf[end + 4:]
    c.body_start = end + 4
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line: {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line: {line[:100]!r}")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if rest:
        c.mark_first()
    return int(parts[1]), headers, rest


async def read_body(c: Client, headers: dict[str, str], rest: bytes, lowat: int) -> None:
    # Once the first body byte is in, the client's only remaining job is to take the rest in and
    # hash it: with SO_RCVLOWAT the kernel wakes it per `lowat` bytes instead of per small piece,
    # which keeps the event loop responsive for the clients still waiting for their first byte.
    # Lowered back to 1 for the last 2 * lowat bytes, so that a server that does not close after
    # the body is not waited on.
    h = hashlib.sha256()
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        await read_chunked(c, h, rest)
    elif "content-length" in headers:
        try:
            want = int(headers["content-length"])
        except ValueError:
            raise ProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
        if len(rest) > want:
            raise ProtocolError("more bytes than Content-Length")
        h.update(rest)
        c.size = len(rest)
        lowat_state = 0 if lowat > 1 else 2  # 0 not yet set, 1 set, 2 done
        while c.size < want:
            if lowat_state == 0 and c.t_first is not None and want - c.size > 2 * lowat:
                c.set_lowat(lowat)
                lowat_state = 1
            elif lowat_state == 1 and want - c.size <= 2 * lowat:
                c.set_lowat(1)
                lowat_state = 2
            data = await c.reader.read(min(READ, want - c.size))
            if not data:
                raise ProtocolError(f"connection closed after {c.size} of {want} body bytes")
            c.mark_first()
            h.update(data)
            c.size += len(data)
        c.t_last = c.reader.last_arrival
        # Connection: close was requested: anything after the body would be a framing error.
        # (A server that keeps the connection open anyway is not waited for long.)
        try:
            extra = await asyncio.wait_for(c.reader.read(1), 5.0)
        except TimeoutError:
            extra = b""
        if extra:
            raise ProtocolError("bytes after the end of the body")
    else:  # read to EOF
        h.update(rest)
        c.size = len(rest)
        lowat_set = False
        while True:
            if not lowat_set and lowat > 1 and c.t_first is not None:
                c.set_lowat(lowat)  # EOF wakes the reader whatever is queued
                lowat_set = True
            data = await c.reader.read(READ)
            if not data:
                break
            c.mark_first()
            h.update(data)
            c.size += len(data)
    if c.t_last is None:
        c.t_last = c.reader.last_arrival or time.perf_counter()
    c.sha256 = h.hexdigest()


async def read_chunked(c: Client, h, rest: bytes) -> None:
    buf = bytearray(rest)

    async def more() -> None:
        data = await c.reader.read(READ)
        if not data:
            raise ProtocolError(f"connection closed inside a chunked body after {c.size} bytes")
        c.mark_first()
        buf.extend(data)

    while True:
        while (nl := buf.find(b"\r\n")) < 0:
            if len(buf) > 4096:
                raise ProtocolError("chunk-size line too long")
            await more()
        line = bytes(buf[:nl]).split(b";", 1)[0].strip()
        try:
            n = int(line, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk-size line {line[:40]!r}") from None
        del buf[:nl + 2]
        if n == 0:
            # Trailers (if any) end with an empty line.
            while True:
                while (nl := buf.find(b"\r\n")) < 0:
                    await more()
                empty = nl == 0
                del buf[:nl + 2]
                if empty:
                    return
        while len(buf) < n + 2:
            await more()
        if bytes(buf[n:n + 2]) != b"\r\n":
            raise ProtocolError("chunk not followed by CRLF")
        h.update(bytes(buf[:n]))
        c.size += n
        del buf[:n + 2]


async def run_client(c: Client, want_sha: str, want_bytes: int, lowat: int) -> None:
    try:
        status, headers, rest = await read_head(c)
        c.status = status
        c.cache_status = headers.get("cache-status")
        c.x_cache = headers.get("x-cache")
        await read_body(c, headers, rest, lowat)
        problems = []
        if status != 200:
            problems.append(f"status {status}")
        if c.size != want_bytes:
            problems.append(f"{c.size} bytes, want {want_bytes}")
        if c.sha256 != want_sha:
            problems.append(f"sha256 {c.sha256[:16]}..., want {want_sha[:16]}...")
        if problems:
            c.mismatch = "; ".join(problems)
    except asyncio.CancelledError:
        c.error = "timeout"
        raise
    except (ProtocolError, OSError, asyncio.IncompleteReadError) as e:
        c.error = f"{type(e).__name__}: {e}"
    finally:
        if c.writer is not None:
            c.writer.close()


async def connect(c: Client, host: str, port: int) -> None:
    try:
        # asyncio.open_connection, with a StreamReader that dates what it is fed.
        loop = asyncio.get_running_loop()
        reader = TimedReader(limit=READ, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.create_connection(lambda: protocol, host, port)
        c.reader, c.writer = reader, asyncio.StreamWriter(transport, protocol, reader, loop)
        c.sock = transport.get_extra_info("socket")
    except OSError as e:
        c.error = f"connect: {type(e).__name__}: {e}"


async def main_async(args, host: str, port: int, target: str) -> dict:
    clients = [Client(i) for i in range(args.clients)]
    host_hdr = host if port == 80 else f"{host}:{port}"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host_hdr}\r\nUser-Agent: imgedge-collapse/1\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")

    deadline = time.monotonic() + args.timeout
    # 1. Every connection first.
    try:
        async with asyncio.timeout(args.connect_timeout):
            await asyncio.gather(*(connect(c, host, port) for c in clients))
    except TimeoutError:
        for c in clients:
            if c.writer is None and c.error is None:
                c.error = "connect: timeout"
    live = [c for c in clients if c.writer is not None and c.error is None]

    # 2. Every request in one tight loop (the event loop does not run in between; each write
    #    goes straight to the socket, TCP_NODELAY is set by asyncio).
    send_times = []
    for c in live:
        c.writer.write(request)
        c.t0 = time.perf_counter()
        send_times.append(c.t0)

    # 3. Read every response, under the overall deadline.
    tasks = [asyncio.create_task(run_client(c, args.sha256, args.bytes, args.rcvlowat)) for c in live]
    remaining = max(0.1, deadline - time.monotonic())
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=remaining)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for c in clients:
        if c.writer is not None and not c.writer.is_closing():
            c.writer.close()

    return summarize(args, clients, send_times)


def summarize(args, clients: list[Client], send_times: list[float]) -> dict:
    def count(values) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in values:
            k = "(none)" if v is None else str(v)
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    done = [c for c in clients if c.error is None and c.t_last is not None]
    followers = [c for c in done if c.cache_status and "collapsed" in c.cache_status]
    others = [c for c in done if not (c.cache_status and "collapsed" in c.cache_status)]

    def group(cs: list[Client]) -> dict:
        return {
            "n": len(cs),
            "head_ms": stats([c.ms(c.t_head) for c in cs]),
            "first_byte_ms": stats([c.ms(c.t_first) for c in cs if c.t_first is not None]),
            "total_ms": stats([c.ms(c.t_last) for c in cs]),
            "client_lag_ms": stats([c.lag() for c in cs if c.lag() is not None]),
        }

    errors = [c for c in clients if c.error is not None]
    mismatches = [c for c in clients if c.mismatch is not None]
    samples = [f"client {c.idx}: {c.error}" for c in errors[:5]]
    samples += [f"client {c.idx}: {c.mismatch}" for c in mismatches[:5]]
    return {
        "url": args.url,
        "clients": len(clients),
        "ok": len(done) - len([c for c in done if c.mismatch]),
        "errors": len(errors),
        "mismatches": len(mismatches),
        "error_samples": samples,
        "send_spread_ms": rnd((max(send_times) - min(send_times)) * 1000.0) if send_times else None,
        "status": count(c.status for c in clients),
        "cache_status": count(c.cache_status for c in clients),
        "x_cache": count(c.x_cache for c in clients),
        "followers": group(followers),
        "others": group(others),
        "all": group(done),
        "_records": [c.record() for c in clients],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description="Many simultaneous clients on one cold URL.")
    ap.add_argument("--url", required=True, help="http://HOST:PORT/PATH?QUERY (plain HTTP only)")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--sha256", required=True, help="expected body sha256 (hex)")
    ap.add_argument("--bytes", type=int, required=True, help="expected body size")
    ap.add_argument("--timeout", type=float, default=120.0, help="overall limit, seconds (default 120)")
    ap.add_argument("--connect-timeout", type=float, default=10.0,
                    help="limit for opening all connections, seconds (default 10)")
    ap.add_argument("--rcvlowat", type=int, default=RCVLOWAT, metavar="BYTES",
                    help="SO_RCVLOWAT once a client has its first body byte (default %(default)s; "
                         "0 or 1 = off), to cut wake-ups while the rest streams in")
    ap.add_argument("--details", metavar="FILE", help="also write one JSON line per client here")
    args = ap.parse_args()

    u = urlsplit(args.url)
    if u.scheme != "http" or not u.hostname:
        print("collapse: --url must be http://HOST[:PORT]/...", file=sys.stderr)
        return 2
    if args.clients < 1 or args.bytes < 0 or args.timeout <= 0:
        print("collapse: --clients >= 1, --bytes >= 0 and --timeout > 0 are required", file=sys.stderr)
        return 2
    args.sha256 = args.sha256.lower()
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")

    summary = asyncio.run(main_async(args, u.hostname, u.port or 80, target))
    records = summary.pop("_records")
    if args.details:
        with open(args.details, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    print(json.dumps(summary), flush=True)
    return 0 if summary["errors"] == 0 and summary["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
