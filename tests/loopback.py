"""Loopback HTTP servers for the stand-ins that have no emulator (IMDS, echoing endpoints, a status front)."""

from __future__ import annotations

import http.server
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    """A request handler with a one-call answer and no console logging."""

    def reply(self, status: int, body: bytes | str, headers: dict[str, str] | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


class Server:
    """``handler`` served on 127.0.0.1 at a free port, in a daemon thread; ``url`` is its base address."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], name: str = "loopback") -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name=name).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
