#!/usr/bin/env python3
"""Static test origin for imgedge load and smoke tests (Python 3.11 stdlib only).

Usage: python3 loadtest/origin.py --corpus DIR --port PORT [--rate BYTES_PER_SECOND]

Binds 127.0.0.1 only and serves, for GET and HEAD:
  /NAME                                     -> DIR/NAME
  /storage/v1/object/public/BUCKET/NAME     -> DIR/NAME (any bucket)
  /__up                                     -> 200 "up\\n"
  /__hits                                   -> JSON {path: count} of file/404 requests
  /__reset                                  -> clears the counts (GET, HEAD or POST)
Anything missing, a directory, or a path that leaves DIR is a 404.
File responses carry Content-Type (from DIR/MANIFEST.tsv if listed, else by
extension), Content-Length, Cache-Control, Last-Modified and ETag, and the body
is sent with sendfile(2). If-None-Match / If-Modified-Since get a 304.
With --rate N (N > 0), every file body is paced to N bytes/s, per response: it
is written in 16 KiB pieces, sleeping so that the cumulative average since the
head was sent never exceeds N (the head itself is not delayed).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import socketserver
import stat
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024
PACED_CHUNK = 16 * 1024  # piece size when --rate paces a body
CACHE_CONTROL = "public, max-age=3600"
STORAGE_PREFIX = "/storage/v1/object/public/"
EXT_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
}
QUIET_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class Origin(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(self, addr, corpus: str, rate: int = 0):
        self.corpus = os.path.realpath(corpus)
        self.rate = rate  # body bytes per second per response; 0 = unlimited
        self.types = load_manifest(self.corpus)
        self.hits: Counter[str] = Counter()
        self.hits_lock = threading.Lock()
        super().__init__(addr, Handler)

    def server_bind(self):
        # HTTPServer.server_bind does a reverse-DNS lookup (getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, QUIET_ERRORS):
            return
        super().handle_error(request, client_address)

    def count(self, path: str) -> None:
        with self.hits_lock:
            self.hits[path] += 1

    def snapshot(self) -> dict[str, int]:
        with self.hits_lock:
            return dict(self.hits)

    def reset(self) -> None:
        with self.hits_lock:
            self.hits.clear()


def load_manifest(corpus: str) -> dict[str, str]:
    types: dict[str, str] = {}
    try:
        with open(os.path.join(corpus, "MANIFEST.tsv"), encoding="utf-8") as f:
            for line in f:
                cols = line.rstrip("\r\n").split("\t")
                if len(cols) >= 3 and cols[0] and cols[2]:
                    types[cols[0]] = cols[2]
    except FileNotFoundError:
        pass
    return types


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "imgedge-test-origin/1"
    disable_nagle_algorithm = True
    timeout = 120  # idle keep-alive connections and stalled writers are dropped after this
    server: Origin

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        pass

    def do_GET(self):
        self.dispatch(head=False)

    def do_HEAD(self):
        self.dispatch(head=True)

    def do_POST(self):
        if self.request_path() == "/__reset":
            self.drain_body()
            self.server.reset()
            self.send_small(200, b"reset\n", "text/plain; charset=utf-8", head=False)
        else:
            self.drain_body()
            self.send_small(405, b"method not allowed\n", "text/plain; charset=utf-8",
                            head=False, extra={"Allow": "GET, HEAD"})

    # -- plumbing ---------------------------------------------------------------

    def request_path(self) -> str:
        # Accept absolute-form targets too; drop query and fragment; percent-decode.
        return unquote(urlsplit(self.path).path or "/")

    def drain_body(self) -> None:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = 0
        while n > 0:
            got = self.rfile.read(min(n, CHUNK))
            if not got:
                break
            n -= len(got)

    def send_small(self, code: int, body: bytes, ctype: str, head: bool, extra=None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except QUIET_ERRORS:
            self.close_connection = True

    def dispatch(self, head: bool) -> None:
        path = self.request_path()
        if path == "/__up":
            return self.send_small(200, b"up\n", "text/plain; charset=utf-8", head)
        if path == "/__hits":
            body = json.dumps(self.server.snapshot(), sort_keys=True).encode() + b"\n"
            return self.send_small(200, body, "application/json", head,
                                   extra={"Cache-Control": "no-store"})
        if path == "/__reset":
            self.server.reset()
            return self.send_small(200, b"reset\n", "text/plain; charset=utf-8", head)
        self.server.count(path)
        rel = self.map_path(path)
        full = self.resolve(rel) if rel else None
        if full is None:
            return self.send_small(404, b"not found\n", "text/plain; charset=utf-8", head)
        self.send_file(rel, full, head)

    @staticmethod
    def map_path(path: str) -> str | None:
        if path.startswith(STORAGE_PREFIX):
            bucket, sep, name = path[len(STORAGE_PREFIX):].partition("/")
            if bucket and sep and name:
                return name
        return path[1:] if path.startswith("/") and len(path) > 1 else None

    def resolve(self, rel: str) -> str | None:
        if "\x00" in rel or "\\" in rel:
            return None
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return None
        root = self.server.corpus
        full = os.path.realpath(os.path.join(root, *parts))
        if os.path.commonpath([root, full]) != root or full == root:
            return None
        return full

    def content_type(self, rel: str) -> str:
        ct = self.server.types.get(rel)
        if ct:
            return ct
        ext = rel.rsplit(".", 1)[-1].lower() if "." in rel else ""
        return EXT_TYPES.get(ext, "application/octet-stream")

    def not_modified(self, etag: str, mtime: int) -> bool:
        inm = self.headers.get("If-None-Match")
        if inm is not None:
            tags = [t.strip() for t in inm.split(",")]
            return "*" in tags or etag in tags or ("W/" + etag) in tags
        ims = self.headers.get("If-Modified-Since")
        if ims:
            try:
                since = email.utils.parsedate_to_datetime(ims).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                return False
            return mtime <= since
        return False

    def send_file(self, rel: str, full: str, head: bool) -> None:
        try:
            f = open(full, "rb")
        except OSError:
            return self.send_small(404, b"not found\n", "text/plain; charset=utf-8", head)
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return self.send_small(404, b"not found\n", "text/plain; charset=utf-8", head)
            size = st.st_size
            etag = '"%d-%x"' % (size, st.st_mtime_ns)
            last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
            common = {
                "Cache-Control": CACHE_CONTROL,
                "Last-Modified": last_modified,
                "ETag": etag,
            }
            try:
                if self.not_modified(etag, int(st.st_mtime)):
                    self.send_response(304)
                    for k, v in common.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", self.content_type(rel))
                self.send_header("Content-Length", str(size))
                for k, v in common.items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                rate = self.server.rate
                if rate == 0:
                    # sendfile(2), as nginx serves files: a Python copy loop would make the origin,
                    # not the cache in front of it, the bottleneck of stream-through load tests
                    self.wfile.flush()
                    sent = self.connection.sendfile(f, 0, size)
                    if sent != size:
                        self.close_connection = True
                    return
                piece = PACED_CHUNK
                start = time.monotonic()
                left = size
                while left > 0:
                    chunk = f.read(min(piece, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    if rate > 0 and left > 0:
                        # Keep the cumulative average at or below `rate`.
                        due = start + (size - left) / rate
                        delay = due - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                if left:
                    # The file shrank under us: the framing is broken, so drop the connection.
                    self.close_connection = True
            except QUIET_ERRORS:
                self.close_connection = True


def main() -> int:
    ap = argparse.ArgumentParser(description="Static test origin for imgedge (127.0.0.1 only).")
    ap.add_argument("--corpus", required=True, help="folder of files to serve (may hold MANIFEST.tsv)")
    ap.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0 picks one)")
    ap.add_argument("--rate", type=int, default=0, metavar="BYTES_PER_SECOND",
                    help="pace every file body to this many bytes/s, per response (default 0 = unlimited)")
    args = ap.parse_args()
    if args.rate < 0:
        print("origin: --rate must be >= 0", file=sys.stderr)
        return 2
    if not os.path.isdir(args.corpus):
        print(f"origin: no such folder: {args.corpus}", file=sys.stderr)
        return 2
    srv = Origin(("127.0.0.1", args.port), args.corpus, rate=args.rate)
    paced = f", bodies paced to {args.rate} B/s each" if args.rate else ""
    print(f"origin: serving {args.corpus} on 127.0.0.1:{srv.server_address[1]}{paced}", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
