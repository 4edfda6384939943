"""The HTTP server the test servers (Hub, S3 proxy) share: threaded, loopback only, no DNS."""

from __future__ import annotations

import socketserver
import threading
from http.server import ThreadingHTTPServer


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server bound to 127.0.0.1 whose handler threads never block exit."""

    daemon_threads = True

    def server_bind(self) -> None:  # skip HTTPServer's getfqdn() lookup (slow without DNS)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def serve_in_background(self) -> str:
        """Serve on a daemon thread; the server's base URL."""
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return f"http://127.0.0.1:{self.server_address[1]}"
