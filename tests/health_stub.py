"""A stand-in for the launcher in tests of ``Server`` itself (how it picks ports, retries and
stops), not of serving: ``python -m tests.health_stub --host H --port P`` binds like the real
launcher (an occupied port is an ``Address already in use`` traceback in its log) and answers
``GET /health`` with 200."""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, HTTPServer


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args, _ = parser.parse_known_args()
    HTTPServer((args.host, args.port), _Health).serve_forever()
