"""Stand-ins around the real Docker engine for the failure tests, so that the engine shared
by every test run is never stopped:

* :class:`EngineProxy`: a unix socket that forwards to the Docker engine's until
  :meth:`EngineProxy.stop` (a worker pointed at it with ``DOCKER_HOST`` sees its engine die
  mid-deal: open connections cut, new ones refused);
* :class:`Registry`: an image registry on 127.0.0.1 (the engine pulls from loopback
  registries over plain HTTP) that answers every manifest with 404 MANIFEST_UNKNOWN (an
  image that does not exist) or 429 TOOMANYREQUESTS (a rate limit);
* :class:`HttpServer`: a requester's file server on 127.0.0.1 (routes, redirects), which
  records every request it gets.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import select
import socket
import threading
from pathlib import Path

ENGINE_SOCKET = "/var/run/docker.sock"


class EngineProxy:
    def __init__(self, path: Path, upstream: str = ENGINE_SOCKET) -> None:
        self.path = path
        self.upstream = upstream
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(64)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                engine.connect(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._stopped.is_set():
                    client.close()
                    engine.close()
                    return
                self._open |= {client, engine}
            threading.Thread(target=self._pump, args=(client, engine), daemon=True).start()

    def _pump(self, client: socket.socket, engine: socket.socket) -> None:
        pair = {client: engine, engine: client}
        try:
            while not self._stopped.is_set():
                ready, _, _ = select.select(list(pair), [], [], 0.2)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    pair[source].sendall(data)
        except OSError:
            return
        finally:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._open -= set(pair)

    def stop(self) -> None:
        """The engine "dies": every open connection is cut, no new one is taken."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class Registry:
    """``mode``: "404" (no such image) or "429" (rate limited)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                owner.requests.append(f"{self.command} {self.path}")
                if self.path.rstrip("/") == "/v2":
                    code, body = 200, {}
                elif owner.mode == "429":
                    code = 429
                    body = {"errors": [{"code": "TOOMANYREQUESTS", "message": "rate limit"}]}
                else:
                    code = 404
                    body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def image(self, name: str) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}/{name}:1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class HttpServer:
    """Serves ``routes`` (path -> (status, headers, body)) on 127.0.0.1; 404 otherwise."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                status, headers, body = owner.routes.get(self.path, (404, {}, b"no such file"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
