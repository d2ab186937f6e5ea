"""A JSON-RPC proxy that misbehaves like a bad node provider, for the fault tests.

Bound to 127.0.0.1, it forwards to one upstream (anvil). Of the calls it receives (seeded,
so a failing run can be replayed):

* ``refuse`` of them get an HTTP 503 without being forwarded;
* ``lose`` of them are forwarded, then the connection is closed without an answer: the node
  did the work (a transaction *was* sent) but the caller cannot know;
* the others are delayed by up to ``max_delay`` seconds.

A method in ``unsupported`` is answered with a JSON-RPC error, as a node without it answers
(geth's "method not found"), and never forwarded. ``methods`` counts the calls by method.
"""

from __future__ import annotations

import collections
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests


class FaultyRpcProxy:
    def __init__(
        self,
        upstream: str,
        *,
        refuse: float = 0.15,
        lose: float = 0.15,
        max_delay: float = 0.1,
        seed: int = 6,
        unsupported: frozenset[str] = frozenset(),
    ) -> None:
        self.upstream = upstream
        self.unsupported = unsupported
        self.methods: collections.Counter[str] = collections.Counter()
        self.refuse = refuse
        self.lose = lose
        self.max_delay = max_delay
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                proxy.handle(self, body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultyRpcProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        session: requests.Session = self.local.session
        return session

    def handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        method = request.get("method") if isinstance(request, dict) else None
        if method is not None:
            with self.lock:
                self.methods[str(method)] += 1
        if method in self.unsupported:
            assert isinstance(request, dict)
            error = {
                "code": -32601,
                "message": f"the method {method} does not exist/is not available",
            }
            refusal = json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "error": error})
            self._count("unsupported")
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(refusal)))
            handler.end_headers()
            handler.wfile.write(refusal.encode())
            return
        with self.lock:
            roll = self.random.random()
            delay = self.random.uniform(0, self.max_delay)
        if roll < self.refuse:
            self._count("refused")
            handler.send_response(503)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if roll >= self.refuse + self.lose:
            threading.Event().wait(delay)
        answer = self._session().post(
            self.upstream, data=body, headers={"Content-Type": "application/json"}, timeout=30
        )
        if roll < self.refuse + self.lose:
            self._count("lost")
            handler.close_connection = True
            handler.connection.close()  # the work is done upstream; the answer is lost
            return
        self._count("forwarded")
        handler.send_response(answer.status_code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(answer.content)))
        handler.end_headers()
        handler.wfile.write(answer.content)

    def _count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1
