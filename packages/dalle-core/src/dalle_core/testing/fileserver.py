"""A loopback HTTP file server for tests of code that downloads through `dalle_core.download`
(stdlib only)::

    from dalle_core.testing.fileserver import FileServer

    with FileServer({"weights.pt": data}) as server:
        local = fetch(RemoteFile(server.url("weights.pt"), "weights.pt"), tmp_path)
        assert server.requests == {"weights.pt": 1}

Unset the ``http_proxy`` / ``HTTP_PROXY`` variables (and ``DALLE_OFFLINE``) in tests that use
it, or urllib sends the requests to the proxy.
"""

from __future__ import annotations

import collections
import http.server
import threading
import time

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


class FileServer:
    """Serves ``files`` (URL path without the leading ``/`` -> bytes) on 127.0.0.1 and counts the
    requests per path (query strings ignored); unknown paths get a 404.

    ``truncate``: paths whose responses announce the full ``Content-Length`` but send only half
    of the bytes, then close (a cut connection). ``delay_s``: seconds each response waits
    before it starts (to make downloads overlap in tests of concurrent callers).
    """

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.truncate: set[str] = set()
        self.delay_s = 0.0
        self.requests: collections.Counter[str] = collections.Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0].lstrip("/")
                server.requests[path] += 1
                time.sleep(server.delay_s)
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if path in server.truncate else body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def url(self, path: str, query: str = "") -> str:
        """The URL of ``path``, with ``?query`` when given (published links often have one)."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.lstrip('/')}" + (
            f"?{query}" if query else ""
        )

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
