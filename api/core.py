"""What iExec tooling reads from a pool, in iexec-core's and the Compass service's shapes.

Requesters use iExec's tools (the SDK's ``iexec task debug``, iexec-core's Java task client),
not ours, so these routes sit at the host root beside ``/api/v1`` and answer exactly what
iexec-core answers:

* ``GET /tasks/{chainTaskId}``: a TaskModel (every field, unset ones ``null``);
* ``GET /tasks/{chainTaskId}/replicates/{walletAddress}``: a ReplicateModel (empty fields
  left out);
* ``GET /tasks/logs/challenge?address=``: an EIP-712 challenge for the requester to sign;
* ``GET /tasks/{chainTaskId}/logs`` (and ``…/replicates/{walletAddress}/logs``) with
  ``Authorization: <hash>_<signature>_<address>``: the task's compute logs, to its requester
  only (403 to anyone else, the challenge is checked after);
* ``GET /{chainId}/workerpools/{address}``: ``{"apiUrl": …}`` for this pool, so a client
  given this API as its Compass finds the routes above.

Field names and status names are iexec's only: its Java client fails on an unknown field or
enum value, so nothing of ours is added here (our own view stays at ``/api/v1/tasks``).
Errors are ``{"error": "<text>"}``, which the SDK prints as ``API error: <text>``.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

from eth_account import Account
from flask import Blueprint, Response, jsonify, request

from api.common import ADDRESS, HEX32
from api.context import ApiContext
from orders.challenge import typed_data_hash
from poco.params import parse_deal_params
from poco.proofs import result_hash
from pool.states import ReplicateStatus, ReplicateStatusCause, TaskStatus

# iexec-core's EIP712ChallengeService: a challenge lives 60 minutes from its creation and is
# reused (not consumed) until then
CHALLENGE_TTL = 3600.0
# challenges kept at once: an anonymous caller may ask for any address, so the oldest go
MAX_CHALLENGES = 10_000
CHALLENGE_DOMAIN = {"name": "iExec Core", "version": "1"}

_TASK_STATUSES = frozenset(str(s) for s in TaskStatus)
_REPLICATE_STATUSES = frozenset(str(s) for s in ReplicateStatus)
_CAUSES = frozenset(str(s) for s in ReplicateStatusCause)
_CONTRIBUTED = frozenset({str(ReplicateStatus.CONTRIBUTED), str(ReplicateStatus.COMPLETED)})


def core_date(value: Any) -> str | None:
    """A date as iexec-core's Jackson writes it: ``2026-01-20T10:15:30.123+00:00``. Stored
    datetimes are naive UTC; chain deadlines are Unix seconds."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    if not isinstance(value, dt.datetime):
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds")


def _non_empty(model: dict[str, Any]) -> dict[str, Any]:
    """``@JsonInclude(NON_EMPTY)``: null, empty strings and empty lists left out."""
    return {k: v for k, v in model.items() if v is not None and v != "" and v != []}


def replicate_model(rep: dict[str, Any], base_url: str) -> dict[str, Any]:
    """A replicate document as iexec-core's ReplicateModel."""
    taskid, worker = rep["chainTaskId"], rep["worker"]
    updates = []
    for event in rep.get("timeline") or []:
        if event.get("status") not in _REPLICATE_STATUSES:
            continue
        update: dict[str, Any] = {"status": event["status"], "date": core_date(event.get("at"))}
        if event.get("cause") in _CAUSES:
            update["cause"] = event["cause"]
        updates.append(update)
    statuses = {event.get("status") for event in rep.get("timeline") or []}
    digest = rep.get("resultDigest")
    contribution = None
    if digest and statuses & _CONTRIBUTED:
        contribution = result_hash(taskid, digest)  # public on chain once contributed
    link = f"{base_url}/tasks/{taskid}/replicates/{worker}"
    exit_code = rep.get("exitCode")
    return _non_empty(
        {
            "self": link,
            "chainTaskId": taskid,
            "walletAddress": worker,
            "currentStatus": rep.get("status"),
            "statusUpdateList": updates,
            "resultLink": rep.get("resultLink"),
            "chainCallbackData": rep.get("callbackData"),
            "contributionHash": contribution,
            "appLogs": f"{link}/logs" if rep.get("appComputeLogsPresent") else None,
            "appExitCode": exit_code if isinstance(exit_code, int) else None,
        }
    )


def task_model(
    task: dict[str, Any],
    deal: dict[str, Any],
    replicates: list[dict[str, Any]],
    base_url: str,
    dapp_name: str | None,
) -> dict[str, Any]:
    """A task document as iexec-core's TaskModel: every field present, in its order."""
    history = []
    for event in task.get("timeline") or []:
        if event.get("status") not in _TASK_STATUSES:
            continue
        change: dict[str, Any] = {"date": core_date(event.get("at")), "status": event["status"]}
        if event.get("txHash"):
            change["chainReceipt"] = {"blockNumber": 0, "txHash": event["txHash"]}
        history.append(change)
    status = task.get("status")
    reveal_deadline = task.get("revealDeadline")
    timeref = task.get("timeref")
    return {
        "chainTaskId": task["chainTaskId"],
        "replicates": [replicate_model(r, base_url) for r in replicates] or None,
        "maxExecutionTime": int(timeref) * 1000 if isinstance(timeref, int) else 0,
        "tag": task.get("tag"),
        "dappType": "DOCKER",
        "dappName": dapp_name,
        "commandLine": parse_deal_params(deal.get("params")).iexec_args or None,
        "initializationBlockNumber": 0,
        "currentStatus": status,
        "trust": int(task.get("trust") or 0),
        "uploadingWorkerWalletAddress": task.get("uploader") or None,
        "consensus": task.get("consensusValue") or None,
        "contributionDeadline": core_date(task.get("contributionDeadline")),
        "revealDeadline": core_date(reveal_deadline) if reveal_deadline else None,
        "finalDeadline": core_date(task.get("finalDeadline")),
        "resultLink": task.get("resultLink") or None,
        "chainCallbackData": task.get("callbackData") or None,
        "dateStatusList": history,
    }


# ---- the logs challenge ---------------------------------------------------------------------
def challenge_typed_data(chain_id: int, challenge: str) -> dict[str, Any]:
    """iexec-core's logs challenge: EIP-712 typed data, domain without a verifying contract."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
            ],
            "Challenge": [{"name": "challenge", "type": "string"}],
        },
        "primaryType": "Challenge",
        "domain": {**CHALLENGE_DOMAIN, "chainId": int(chain_id)},
        "message": {"challenge": challenge},
    }


class LogChallenges:
    """The challenge of each address, in this process's memory as iexec-core keeps them:
    created on the first request, the same one answered for 60 minutes, then gone. At most
    :data:`MAX_CHALLENGES` at once (the oldest are dropped first)."""

    def __init__(self, ttl: float = CHALLENGE_TTL, limit: int = MAX_CHALLENGES) -> None:
        self.ttl = ttl
        self.limit = limit
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def for_address(self, address: str) -> str:
        now = time.monotonic()
        key = address.lower()
        with self._lock:
            self._expire(now)
            hit = self._items.get(key)
            if hit is not None:
                return hit[1]
            text = base64.b64encode(secrets.token_bytes(32)).decode()
            self._items[key] = (now, text)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
            return text

    def current(self, address: str) -> str | None:
        with self._lock:
            self._expire(time.monotonic())
            hit = self._items.get(address.lower())
            return None if hit is None else hit[1]

    def _expire(self, now: float) -> None:
        while self._items:
            created, _ = next(iter(self._items.values()))
            if now - created < self.ttl:
                return
            self._items.popitem(last=False)


def recover_signer(digest: str, signature: str) -> str | None:
    """The address that signed ``digest`` (raw EIP-712 digest, no message prefix), or None
    when the signature cannot be read."""
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        if len(raw) != 65:
            return None
        v = raw[64] if raw[64] >= 27 else raw[64] + 27
        address = Account._recover_hash(
            bytes.fromhex(digest.removeprefix("0x")), vrs=(v, raw[:32], raw[32:64])
        )
    except (ValueError, TypeError):
        return None
    return str(address).lower()


# ---- the routes -----------------------------------------------------------------------------
def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message}), status


def create_blueprint(context: ApiContext) -> Blueprint:
    bp = Blueprint("core", __name__)
    challenges = LogChallenges()
    apps: dict[str, str] = {}

    def base_url() -> str:
        """Where the links of the replicates point: WORKERPOOL_PUBLIC_URL, else the host the
        request came to."""
        return (context.settings.public_url or request.host_url).rstrip("/")

    def chain_id() -> int | None:
        facts = context.chain.facts()
        if facts.chain_id is not None:
            return facts.chain_id
        return context.settings.chain_id or None

    def dapp_name(app: str | None) -> str | None:
        """The app's image (its multiaddr on chain, immutable: read once per app)."""
        if not app:
            return None
        if app not in apps:
            try:
                raw = context.chain.client().app_multiaddr(app)
            except Exception:  # chain down: the field stays null, the rest is served
                return None
            apps[app] = bytes(raw).decode("utf-8", errors="replace")
        return apps[app]

    def lookup(taskid: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        if not HEX32.match(taskid):
            return None
        task = context.store.task(taskid.lower())
        if task is None:
            return None
        return task, context.store.deal(task.get("chainDealId", "")) or {}

    @bp.get("/tasks/<taskid>")
    def task(taskid: str) -> Any:
        found = lookup(taskid)
        if found is None:
            return _error(404, f"task {taskid} not found")
        doc, deal = found
        reps = context.store.replicates_in_order(doc["chainTaskId"])
        return jsonify(task_model(doc, deal, reps, base_url(), dapp_name(deal.get("app"))))

    @bp.get("/tasks/<taskid>/replicates/<wallet>")
    def replicate(taskid: str, wallet: str) -> Any:
        rep = None
        if HEX32.match(taskid) and ADDRESS.match(wallet):
            rep = context.store.replicate(taskid.lower(), wallet.lower())
        if rep is None:
            return _error(404, f"replicate of {wallet} on task {taskid} not found")
        return jsonify(replicate_model(rep, base_url()))

    @bp.get("/tasks/logs/challenge")
    def logs_challenge() -> Any:
        address = request.args.get("address", "")
        if not ADDRESS.match(address):
            return _error(400, "address must be 0x followed by 40 hex digits")
        chain = chain_id()
        if chain is None:
            return _error(503, "the chain id is unknown (chain unreachable, IEXEC_CHAIN_ID unset)")
        return jsonify(challenge_typed_data(chain, challenges.for_address(address)))

    def authorized_requester(taskid: str) -> tuple[Response, int] | str:
        """The requester's address when the Authorization header proves it, else the error."""
        header = request.headers.get("Authorization")
        if header is None:
            return _error(400, "the Authorization header is missing (<hash>_<signature>_<address>)")
        parts = header.split("_")
        if len(parts) != 3 or not ADDRESS.match(parts[2]):
            return _error(401, "Authorization must be <hash>_<signature>_<address>")
        address = parts[2].lower()
        found = lookup(taskid)
        requester = str(found[1].get("requester") or "").lower() if found else ""
        if not requester or requester != address:
            return _error(403, "only the task's requester may read its logs")
        chain, challenge = chain_id(), challenges.current(address)
        if chain is None or challenge is None:
            return _error(401, "no live challenge for this address: GET /tasks/logs/challenge")
        digest = typed_data_hash(challenge_typed_data(chain, challenge))
        if recover_signer(digest, parts[1]) != address:
            return _error(401, "the signature is not the address's over its challenge")
        return address

    def log_entry(entry: dict[str, Any]) -> dict[str, Any]:
        return _non_empty(
            {
                "walletAddress": entry.get("walletAddress"),
                "stdout": entry.get("stdout"),
                "stderr": entry.get("stderr"),
            }
        )

    @bp.get("/tasks/<taskid>/logs")
    def task_logs(taskid: str) -> Any:
        allowed = authorized_requester(taskid)
        if not isinstance(allowed, str):
            return allowed
        taskid = taskid.lower()
        entries = context.store.compute_logs(taskid)
        if not entries:
            return _error(404, f"no compute logs for task {taskid}")
        return jsonify({"chainTaskId": taskid, "computeLogsList": [log_entry(e) for e in entries]})

    @bp.get("/tasks/<taskid>/replicates/<wallet>/logs")
    def replicate_logs(taskid: str, wallet: str) -> Any:
        allowed = authorized_requester(taskid)
        if not isinstance(allowed, str):
            return allowed
        for entry in context.store.compute_logs(taskid.lower()):
            if entry.get("walletAddress") == wallet.lower():
                return jsonify(log_entry(entry))
        return _error(404, f"no compute logs of {wallet} for task {taskid}")

    @bp.get("/<int:chain>/workerpools/<address>")
    def compass(chain: int, address: str) -> Any:
        pool = str(context.settings.pool_address or "")
        if not pool or address.lower() != pool.lower():
            return _error(404, f"workerpool {address} is not served here")
        known = chain_id()
        if known is None:
            return _error(503, "the chain id is unknown (chain unreachable, IEXEC_CHAIN_ID unset)")
        if chain != known:
            return _error(404, f"this pool is on chain {known}, not {chain}")
        # the SDK resolves routes against apiUrl from the root: a path in it would be lost
        parts = urlsplit(base_url())
        return jsonify({"address": pool, "apiUrl": f"{parts.scheme}://{parts.netloc}"})

    return bp
