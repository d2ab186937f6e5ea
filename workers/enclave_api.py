"""The node's enclave API: where the pre- and post-compute stages of a TEE task report, as
iexec-worker's ``ComputeController`` (port ``IEXEC_WORKER_PORT``, 13100) serves them.

* ``POST /compute/{pre|post}/{taskid}/exit-causes`` with ``[{"cause", "message"}]``: why the
  stage failed (iexec-common ``ReplicateStatusCause`` names; another name is kept as the
  stage's ``*_FAILED_UNKNOWN_ISSUE``). 400 for an empty list, 208 when the stage already
  reported.
* ``POST /compute/post/{taskid}/computed`` with the computed file (``task-id``,
  ``result-digest``, ``enclave-signature``, ``callback-data``, ...): the result the enclave
  signed. 400 when ``task-id`` is not the task of the path; 401 when the file was already
  written, the digest is not a non-zero bytes32, the signature is not 65 bytes, or the chain
  says the task is not ACTIVE or not a TEE task (iexec-worker's ``writeComputedFile``).
  The deprecated paths ``/compute/{stage}/{taskid}/exit`` (one ``{"cause"}``) and
  ``/iexec_out/{taskid}/computed`` are served too.

Every call carries ``Authorization``: an EIP-191 signature by the task's enclave key of
keccak256(taskid ‖ worker); a task this node does not run answers 404, any other signer
401. The computed file is written outside the app's ``/iexec_out``: what an app writes there
as its own ``computed.json`` is never taken for the enclave's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pool.states import ReplicateStatusCause as Cause
from pool.tee import enclave_call_digest, personal_signer

log = logging.getLogger(__name__)

STAGES = ("pre", "post")
MAX_BODY = 64 * 1024
MAX_CAUSES = 32
_TASK = r"(0x[0-9a-fA-F]{64})"
_EXIT_CAUSES = re.compile(rf"^/compute/(pre|post)/{_TASK}/exit-causes$")
_EXIT = re.compile(rf"^/compute/(pre|post)/{_TASK}/exit$")
_COMPUTED = re.compile(rf"^/compute/post/{_TASK}/computed$")
_COMPUTED_OLD = re.compile(rf"^/iexec_out/{_TASK}/computed$")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_SIG65 = re.compile(r"^0x[0-9a-fA-F]{130}$")
_KNOWN = frozenset(str(c) for c in Cause)

# why a computed file cannot be written for a task, from the chain ("" when it can)
ChainCheck = Callable[[str], str]


@dataclass
class Expected:
    """A task whose stages may call: its enclave challenge and where its computed file goes."""

    enclave: str
    computed_path: Path
    causes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


class EnclaveApi:
    """The HTTP server the stages of this node's TEE tasks call (one per compute process)."""

    def __init__(self, bind: str, worker: str, chain_check: ChainCheck) -> None:
        host, _, port = bind.rpartition(":")
        self.worker = worker
        self.chain_check = chain_check
        self._tasks: dict[str, Expected] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, int(port)), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """host:port the stages call (a wildcard bind is reached through the loopback)."""
        host, port = self._server.server_address[:2]
        host = str(host)
        return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="enclave-api"
        )
        self._thread.start()
        log.info("enclave API listening on %s", self.address)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- the tasks under way ------------------------------------------------------------------
    def expect(self, taskid: str, enclave: str, computed_path: Path) -> None:
        with self._lock:
            self._tasks[taskid.lower()] = Expected(enclave.lower(), computed_path)

    def forget(self, taskid: str) -> None:
        with self._lock:
            self._tasks.pop(taskid.lower(), None)

    def exit_causes(self, taskid: str, stage: str) -> list[tuple[str, str]]:
        """The (cause, message) a stage of ``taskid`` reported, [] when it reported none."""
        with self._lock:
            expected = self._tasks.get(taskid.lower())
            return list(expected.causes.get(stage, [])) if expected else []

    # ---- the calls --------------------------------------------------------------------------
    def _authorized(self, taskid: str, authorization: str) -> tuple[int, Expected | None]:
        with self._lock:
            expected = self._tasks.get(taskid.lower())
        if expected is None:
            return HTTPStatus.NOT_FOUND, None
        signer = personal_signer(enclave_call_digest(taskid, self.worker), authorization)
        if signer is None or signer != expected.enclave:
            return HTTPStatus.UNAUTHORIZED, None
        return HTTPStatus.OK, expected

    def post_exit_causes(
        self, stage: str, taskid: str, authorization: str, body: Any
    ) -> HTTPStatus:
        status, expected = self._authorized(taskid, authorization)
        if expected is None:
            return HTTPStatus(status)
        if not isinstance(body, list) or not body or len(body) > MAX_CAUSES:
            return HTTPStatus.BAD_REQUEST
        unknown = f"{stage.upper()}_COMPUTE_FAILED_UNKNOWN_ISSUE"
        causes = []
        for item in body:
            if not isinstance(item, dict) or not isinstance(item.get("cause"), str):
                return HTTPStatus.BAD_REQUEST
            name, message = item["cause"], item.get("message")
            text = message[:500] if isinstance(message, str) else ""
            if name not in _KNOWN or not name.startswith(f"{stage.upper()}_COMPUTE_"):
                text = f"{name[:80]}: {text}" if text else name[:80]
                name = unknown
            causes.append((name, text))
        with self._lock:
            if stage in expected.causes:
                return HTTPStatus.ALREADY_REPORTED
            expected.causes[stage] = causes
        log.info("task %s: %s-compute reported %s", taskid, stage, [c for c, _ in causes])
        return HTTPStatus.OK

    def post_computed(self, taskid: str, authorization: str, body: Any) -> HTTPStatus:
        status, expected = self._authorized(taskid, authorization)
        if expected is None:
            return HTTPStatus(status)
        if not isinstance(body, dict) or str(body.get("task-id", "")).lower() != taskid.lower():
            return HTTPStatus.BAD_REQUEST
        digest, signature = body.get("result-digest"), body.get("enclave-signature")
        if not isinstance(digest, str) or not _BYTES32.match(digest) or int(digest, 16) == 0:
            return HTTPStatus.UNAUTHORIZED
        if not isinstance(signature, str) or not _SIG65.match(signature):
            return HTTPStatus.UNAUTHORIZED
        callback = body.get("callback-data")
        if callback is not None and not isinstance(callback, str):
            return HTTPStatus.BAD_REQUEST
        why = self.chain_check(taskid)
        if why:
            log.warning("task %s: computed file refused: %s", taskid, why)
            return HTTPStatus.UNAUTHORIZED
        computed = {
            "task-id": taskid.lower(),
            "result-digest": digest.lower(),
            "enclave-signature": signature.lower(),
            "callback-data": callback,
            "deterministic-output-path": body.get("deterministic-output-path")
            if isinstance(body.get("deterministic-output-path"), str)
            else None,
        }
        with self._lock:
            path = expected.computed_path
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return HTTPStatus.UNAUTHORIZED  # written once, never replaced
            with os.fdopen(fd, "w") as out:
                json.dump(computed, out)
        log.info("task %s: the enclave's computed file received", taskid)
        return HTTPStatus.OK


def _handler(api: EnclaveApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "workerpool-enclave-api"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("enclave API %s: " + format, self.client_address[0], *args)

        def _answer(self, status: HTTPStatus, text: str = "") -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                return
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                self._answer(HTTPStatus.BAD_REQUEST, "the body is not JSON")
                return
            authorization = self.headers.get("Authorization") or ""
            if match := _EXIT_CAUSES.match(path):
                status = api.post_exit_causes(match[1], match[2], authorization, body)
            elif match := _EXIT.match(path):
                one = [body] if isinstance(body, dict) else body
                status = api.post_exit_causes(match[1], match[2], authorization, one)
            elif match := _COMPUTED.match(path) or _COMPUTED_OLD.match(path):
                status = api.post_computed(match[1], authorization, body)
                if status == HTTPStatus.OK:
                    self._answer(status, match[1])
                    return
            else:
                status = HTTPStatus.NOT_FOUND
            self._answer(status)

    return Handler
