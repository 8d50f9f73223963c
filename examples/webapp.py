#!/usr/bin/env python3
"""The Quickstart's web server: a tiny service setpoint keeps running (`process/webapp`) and checks
(`http_check/webapp`). Standard library only.

    python examples/webapp.py --port 8080

`GET /` answers 200 while the service is healthy. To see setpoint heal it:

    curl -X POST http://127.0.0.1:8080/-/fail   # from now on, GET / answers 500
    curl -X POST http://127.0.0.1:8080/-/hang   # from now on, GET / never answers

Either way the check fails, an issue is reported on `process/webapp`, and
setpoint restarts the process, which comes back healthy. `kill -9` it and it
is restarted as a crash.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_state = {"mode": "ok"}
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        with _lock:
            mode = _state["mode"]
        if mode == "hang":
            time.sleep(3600)
            return
        status = 500 if mode == "fail" else 200
        body = f"webapp pid {os.getpid()}: {'failing' if status == 500 else 'ok'}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        mode = {"/-/fail": "fail", "/-/hang": "hang", "/-/ok": "ok"}.get(self.path)
        if mode is None:
            self.send_error(404)
            return
        with _lock:
            _state["mode"] = mode
        print(f"webapp: now {mode}", flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        print(f"webapp: {self.address_string()} {format % args}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"webapp: serving on http://{args.host}:{args.port}/ (pid {os.getpid()})", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
