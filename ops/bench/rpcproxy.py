"""A counting JSON-RPC proxy for the benchmarks: put it in front of anvil, point every service
at ``http://127.0.0.1:<port>/r/<role>`` and it counts, per role, every JSON-RPC method called
and every transaction sent (``eth_sendRawTransaction``, by PoCo function, decoded from the
raw transaction's selector).

Run it as its own process so that its CPU is not the pool's::

    python ops/bench/rpcproxy.py --upstream http://127.0.0.1:8547 --port-file /tmp/port

``GET /__stats`` answers the counts as JSON; ``POST /__reset`` zeroes them. Bound to
127.0.0.1 only; forwards to the one upstream it was given, nowhere else.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def selector_names() -> dict[str, str]:
    """4-byte selector (hex, no 0x) -> function name, for the PoCo proxy and the registries."""
    from eth_utils.abi import function_abi_to_4byte_selector

    from poco.abi import load_abi, proxy_abi

    names: dict[str, str] = {}
    abis = [proxy_abi()]
    for extra in ("AppRegistry", "WorkerpoolRegistry", "DatasetRegistry"):
        try:
            abis.append(load_abi(extra))
        except Exception:
            continue
    for abi in abis:
        for entry in abi:
            if entry.get("type") == "function":
                names[function_abi_to_4byte_selector(entry).hex()] = entry["name"]
    return names


def tx_selector(raw_hex: str) -> str:
    """The 4-byte selector of a signed raw transaction (legacy or typed), '' for a transfer."""
    import rlp

    raw = bytes.fromhex(raw_hex.removeprefix("0x"))
    if raw and raw[0] < 0x7F:  # typed: type byte, then the RLP list
        fields = rlp.decode(raw[1:])
        data = fields[7] if raw[0] in (1, 2) and len(fields) > 7 else b""
        if raw[0] == 1:
            data = fields[6]
    else:
        fields = rlp.decode(raw)
        data = fields[5]
    return bytes(data[:4]).hex()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "lock", threading.Lock()):
            self.calls: dict[str, collections.Counter[str]] = collections.defaultdict(
                collections.Counter
            )
            self.txs: dict[str, collections.Counter[str]] = collections.defaultdict(
                collections.Counter
            )
            self.latency_s: dict[str, float] = collections.defaultdict(float)
            self.started = time.time()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "since": self.started,
                "calls": {r: dict(c) for r, c in self.calls.items()},
                "transactions": {r: dict(c) for r, c in self.txs.items()},
                "upstream_seconds": {r: round(s, 4) for r, s in self.latency_s.items()},
            }


def make_server(upstream: str, port: int = 0) -> ThreadingHTTPServer:
    stats = Stats()
    names = selector_names()
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/__stats":
                self._reply(200, json.dumps(stats.snapshot()).encode())
            else:
                self._reply(404, b"{}")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path == "/__reset":
                stats.reset()
                self._reply(200, b"{}")
                return
            role = self.path.removeprefix("/r/").strip("/") or "other"
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            requests_ = payload if isinstance(payload, list) else [payload]
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            t0 = time.perf_counter()
            try:
                r = session.post(
                    upstream, data=body, headers={"Content-Type": "application/json"}, timeout=60
                )
                code, out = r.status_code, r.content
            except requests.RequestException as exc:
                code, out = 502, json.dumps({"error": str(exc)}).encode()
            elapsed = time.perf_counter() - t0
            with stats.lock:
                stats.latency_s[role] += elapsed
                for req in requests_:
                    if not isinstance(req, dict):
                        continue
                    method = str(req.get("method"))
                    stats.calls[role][method] += 1
                    if method == "eth_sendRawTransaction":
                        try:
                            sel = tx_selector(req["params"][0])
                            name = names.get(sel, sel or "transfer")
                        except Exception:
                            name = "undecoded"
                        stats.txs[role][name] += 1
            self._reply(code, out)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    a = p.parse_args()
    server = make_server(a.upstream, a.port)
    Path(a.port_file).write_text(str(server.server_address[1]))
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
