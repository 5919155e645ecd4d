"""HTTP for the studio: the standard library's threading server, one page, a JSON API.

    GET  /                 the page (static/index.html, with its .js and .css; nothing from elsewhere)
    GET  /api/info         the model: resolution, grid, attribute names, ...
    POST /api/generate     JSON in, JSON out (studio.api describes the fields)
    POST /api/edit

Every error is answered as {"error": "..."} with a 4xx status (5xx for a bug, with the traceback on
the server's stderr), and the server keeps serving. Requests run on their own threads; the engine's
lock lets one at a time use the model.

Bound to a loopback address, the server also refuses requests whose Host header names another
host: a web page elsewhere cannot reach it through DNS rebinding.
"""
from __future__ import annotations

import ipaddress
import json
import socket
import sys
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from studio.api import RequestError
from studio.engine import Engine

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
MAX_BODY = 8 * 2**20  # bytes; a 2048x2048 PNG photo fits, anything larger is refused unread
# The page may load only its own files and the data: URLs of the pictures it is sent.
CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")


class StudioServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: the default 5 reset connections of a burst of requests

    def __init__(self, engine: Engine, host: str, port: int, quiet: bool = False) -> None:
        self.engine, self.quiet = engine, quiet
        self.loopback = _is_loopback(host)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), StudioHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


class StudioHandler(BaseHTTPRequestHandler):
    server: StudioServer
    server_version = "studio"

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/info":
            return self._json(HTTPStatus.OK, self.server.engine.describe())
        name = "index.html" if path == "/" else path.removeprefix("/static/")
        files = {p.name: p for p in STATIC.iterdir()}  # only these names are served: no path walking
        if path not in ("/", f"/static/{name}") or name not in files:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})
        body = files[name].read_bytes()
        self._send(HTTPStatus.OK, body, CONTENT_TYPES.get(files[name].suffix, "application/octet-stream"))

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        routes = {"/api/generate": self.server.engine.generate, "/api/edit": self.server.engine.edit}
        if self.path not in routes:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {self.path}"})
        try:
            body = self._read_json()
            return self._json(HTTPStatus.OK, routes[self.path](body))
        except RequestError as e:
            return self._json(e.status, {"error": str(e)})
        except ValueError as e:  # the product's own checks (decoding, tokenizer) speak to the user
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down
            traceback.print_exc(file=sys.stderr)
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(e).__name__}: {e}"})

    def do_HEAD(self) -> None:  # a HEAD answer has no body: the status and headers say it
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "application/json", body_allowed=False)

    def _not_allowed(self) -> None:
        self.close_connection = True  # a body it may have sent is not read
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"method {self.command} is not allowed: GET the page "
                                                            f"and /api/info, POST /api/generate and /api/edit"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (an unknown method, a malformed request line, ...) as JSON too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        body = code >= 200 and code not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED) and self.command != "HEAD"
        self._send(code, json.dumps({"error": message or phrase}).encode(), "application/json", body_allowed=body)

    def _read_json(self) -> Any:
        if self.headers.get_content_type() != "application/json":
            raise RequestError("send the request as Content-Type: application/json", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
        if not length.strip().isdigit():
            self.close_connection = True  # where the body ends is unknown
            raise RequestError(f"Content-Length must be a number of bytes, got {length[:40]!r}")
        length = length.strip()
        if int(length) > MAX_BODY:
            self._discard(int(length))
            raise RequestError(f"request of {int(length)} bytes is over the {MAX_BODY} byte limit",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"malformed JSON: {e}") from None
        except RecursionError:
            raise RequestError("JSON nested too deeply: the requests are flat objects") from None

    def _discard(self, length: int) -> None:
        """Read a refused body in chunks, so the client gets its answer instead of a reset connection."""
        self.close_connection = True
        left = min(length, 32 * MAX_BODY)
        while left > 0 and (chunk := self.rfile.read(min(left, 2**20))):
            left -= len(chunk)

    def _host_ok(self) -> bool:
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name in LOCAL_NAMES:
            return True
        self._json(HTTPStatus.FORBIDDEN, {"error": f"Host {host!r} refused: this server only answers to localhost"})
        return False

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, body_allowed: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, POST")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body_allowed:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
