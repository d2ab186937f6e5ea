"""Every message between the scheduler and the worker nodes, and the Celery app that carries
them.

A message is a Celery task sent by name to a Redis queue; each service registers only the
receivers of its own messages on its own app. For each message this module fixes, once:

* its task name and queue (:data:`AUTHORIZE`, :data:`REPORT`, ...);
* its payload, a frozen dataclass (:class:`ReplicateJob`, :class:`ReplicateReport`, ...),
  which travels as one JSON object (:meth:`Payload.to_wire`);
* how it is sent (:class:`Messenger`, one typed method per message) and how it is read
  (:meth:`Payload.from_wire`, which refuses an unknown field or a value of the wrong type
  with :class:`MessageError` before the receiver acts on anything).

* ``scheduler.tick``, ``scheduler.listen``: beat -> scheduler (``scheduler`` queue);
* ``workers.run_replicate`` (:class:`ReplicateJob`): scheduler -> any worker
  (``replicates.<capability>``);
* ``scheduler.authorize`` (:class:`AuthorizeRequest`, answered with :class:`Authorization`),
  ``scheduler.replicate_update`` (:class:`ReplicateReport`), ``scheduler.worker_heartbeat``
  (:class:`Heartbeat`): worker -> scheduler (``scheduler``);
* ``workers.contribute`` (:class:`TaskRef`): a node's compute process -> its control process,
  and ``workers.reveal``, ``workers.upload`` (:class:`TaskRef`), ``workers.abort``
  (:class:`AbortRequest`): scheduler -> one worker (``worker.<address>``).

Every worker -> scheduler message travels in a signed envelope (:class:`MessageSigner` seals
it with the node's wallet, :meth:`Message.open` checks it where the scheduler receives it):
an EIP-712 signature over the message's name, the worker it speaks for, the hash of its
payload, a random nonce and the time it was issued, in the domain of this chain and this
workerpool. Anything that can write to Redis can send a message; only the holder of a
worker's key can send one the scheduler takes as that worker's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import logging
import math
import os
import re
import time
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Self, TypedDict, TypeVar

import coincurve
from celery import Celery
from eth_utils import is_address, keccak, to_checksum_address
from kombu import Queue

from poco.orders import ZERO_ADDRESS
from poco.tags import tag_to_int, tee_framework
from pool import broker, keys
from pool.settings import Settings
from pool.states import ReplicateStatus, ReplicateStatusCause

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

# ---- queues ------------------------------------------------------------------------------------
SCHEDULER_QUEUE = "scheduler"
REPLICATE_QUEUES = {
    "standard": "replicates.standard",
    "gpu": "replicates.gpu",
    "tee-scone": "replicates.tee-scone",
    "tee-gramine": "replicates.tee-gramine",
    "tee-tdx": "replicates.tee-tdx",
}
QUEUE_CAPABILITY = {queue: name for name, queue in REPLICATE_QUEUES.items()}


def worker_queue(address: str) -> str:
    """The queue only one worker node consumes (contribute, reveal and upload requests)."""
    return f"worker.{address.lower()}"


TEE, GPU = 1 << 0, 1 << 8


def queue_for_tag(tag: str | bytes | int) -> str:
    """The replicate queue a deal's tag selects (its TEE framework first, then GPU)."""
    value = tag_to_int(tag)
    framework = tee_framework(value) if value & TEE else None
    if framework is not None:
        return REPLICATE_QUEUES[f"tee-{framework}"]
    if value & GPU:
        return REPLICATE_QUEUES["gpu"]
    return REPLICATE_QUEUES["standard"]


# ---- payloads ----------------------------------------------------------------------------------
class MessageError(ValueError):
    """A message whose payload is not what its name promises: refused, nothing applied."""


class AnswerLost(Exception):
    """A request sent, its answer never received: what the other side did is unknown."""


class Payload:
    """A message body: a frozen dataclass sent as one JSON object of its fields (a field left
    at None, or at its default empty list, is not sent)."""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None or (value == () and f.default == ()):
                continue
            wire[f.name] = list(value) if isinstance(value, tuple) else value
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        """The payload ``data`` carries, checked field by field."""
        if not isinstance(data, Mapping):
            raise MessageError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints, known = _fields_of(cls)  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise MessageError(f"{cls.__name__}: unknown field(s) {', '.join(map(str, unknown))}")
        values: dict[str, Any] = {}
        for name, f in known.items():
            if name not in data or data[name] is None:
                required = (
                    f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING
                    and not _optional(hints[name])
                )
                if required:
                    raise MessageError(f"{cls.__name__}: missing field {name!r}")
                continue
            values[name] = _check(cls.__name__, name, hints[name], data[name])
        return cls(**values)


@functools.cache
def _fields_of(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    """A payload class's type hints and fields, read once (``get_type_hints`` evaluates every
    annotation: it cost more than checking a message's signature)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _check(owner: str, name: str, hint: Any, value: Any) -> Any:
    """``value`` as the field's type ``hint`` says, or MessageError."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list | tuple):
            raise MessageError(f"{owner}.{name}: expected a list, got {type(value).__name__}")
        return tuple(_check(owner, name, item, v) for v in value)
    if isinstance(hint, type) and issubclass(hint, enum.StrEnum):
        try:
            return hint(value)
        except ValueError:
            raise MessageError(f"{owner}.{name}: unknown {hint.__name__} {value!r}") from None
    ok = (
        isinstance(value, bool)
        if hint is bool
        else isinstance(value, int | float) and not isinstance(value, bool)
        if hint is float
        else isinstance(value, int) and not isinstance(value, bool)
        if hint is int
        else isinstance(value, hint)
    )
    if not ok:
        raise MessageError(
            f"{owner}.{name}: expected {hint.__name__}, got {type(value).__name__} {value!r:.40}"
        )
    return float(value) if hint is float else value


@dataclass(frozen=True)
class ReplicateJob(Payload):
    """A replicate to compute for ``taskid``; workers read everything else from the chain."""

    taskid: str
    deadline: int | None = None  # the contribution deadline: a late job is dropped unread


@dataclass(frozen=True)
class TaskRef(Payload):
    """Contribute, reveal or upload the result this node holds for ``taskid``."""

    taskid: str


@dataclass(frozen=True)
class AuthorizeRequest(Payload):
    taskid: str
    worker: str
    enclave: str = ZERO_ADDRESS
    # Unix time after which the worker no longer waits for the answer: a request read later
    # is refused rather than granted a slot nobody will use
    expires_at: float | None = None


@dataclass(frozen=True)
class AbortRequest(Payload):
    """The scheduler no longer needs ``taskid``'s replicate of the worker whose queue this is
    on (consensus reached without it, contribution deadline passed, task final, no progress
    within its bound): stop its container, free its slot, delete its files, report ABORTED."""

    taskid: str
    cause: ReplicateStatusCause
    reason: str = ""
    # the scheduler's signature (poco.proofs.sign_abort): anyone can write to Redis, only the
    # pool owner's key makes a node stop a replicate
    signature: str = ""


@dataclass(frozen=True)
class Authorization(Payload):
    """The scheduler's answer to an :class:`AuthorizeRequest`. A refusal says whether the job
    goes back to the queue for another worker (``requeue``) or is stale and dropped."""

    granted: bool
    reason: str = ""
    requeue: bool = False
    signature: str = ""
    enclave: str = ""
    workerpool: str = ""
    fast_path: bool = False  # trust 1: contributeAndFinalize in one transaction


@dataclass(frozen=True)
class ReplicateReport(Payload):
    """A status change of ``worker``'s replicate of ``taskid``, with what the status carries."""

    taskid: str
    worker: str
    status: ReplicateStatus
    tx_hash: str | None = None
    reason: str | None = None  # why a failure happened
    cause: ReplicateStatusCause | None = None  # the same, as iexec names it
    note: str | None = None
    log_tail: str | None = None  # a failed run's last output lines
    stdout: str | None = None  # the app's compute logs (COMPUTED, COMPUTE_FAILED), capped
    stderr: str | None = None
    exit_code: int | None = None
    duration: float | None = None  # seconds the app ran
    result_link: str | None = None  # RESULT_UPLOADED (COMPLETED: the scheduler reads the chain)
    callback_data: str | None = None
    finalized: bool = False  # COMPLETED by the worker's contributeAndFinalize
    upload_failed: bool = False  # REVEALED again: the upload asked of it failed
    # ABORTED because of the node itself (its Docker engine, the registry as seen from it,
    # its disk): planned on another node, and counted towards pausing this one
    node_fault: bool = False
    # the progress statuses the replicate went through since the node's previous report,
    # oldest first, and when (Unix seconds): reported with this one instead of one message
    # each (workers/reporting.py)
    passed: tuple[ReplicateStatus, ...] = ()
    passed_at: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.passed) != len(self.passed_at):
            raise MessageError("ReplicateReport: passed and passed_at differ in length")
        if len(self.passed) > MAX_PASSED or len(set(self.passed)) != len(self.passed):
            raise MessageError(f"ReplicateReport: at most {MAX_PASSED} distinct passed statuses")
        if self.status in self.passed or not all(math.isfinite(t) for t in self.passed_at):
            raise MessageError("ReplicateReport: passed must be other statuses, at finite times")


# a report carries at most this many statuses it passed (a replicate's whole progress)
MAX_PASSED = 8


class ReportFields(TypedDict, total=False):
    """What a :class:`ReplicateReport` carries beside its task, worker and status: the
    keyword arguments a worker node's ``report`` takes, checked by the type checker."""

    tx_hash: str | None
    reason: str | None
    cause: ReplicateStatusCause | None
    note: str | None
    log_tail: str | None
    stdout: str | None
    stderr: str | None
    exit_code: int | None
    duration: float | None
    result_link: str | None
    callback_data: str | None
    finalized: bool
    upload_failed: bool
    node_fault: bool


@dataclass(frozen=True)
class Heartbeat(Payload):
    """A node is alive, and what it offers."""

    worker: str
    name: str
    capabilities: tuple[str, ...]
    slots: int
    busy_slots: int
    version: str
    cpus: int | None = None
    memory_mb: int | None = None
    # why the node gave jobs back lately (no gas, not enough stake); None: it takes them
    refusing: str | None = None


MAX_NAME = 64
MAX_VERSION = 32
MAX_CPUS = 4096
MAX_MEMORY_MB = 1 << 24  # 16 TiB


def heartbeat_problem(beat: Heartbeat, max_slots: int) -> str | None:
    """Why ``beat`` cannot be believed (a value out of its bounds), or None."""
    printable = re.compile(r"[\x20-\x7e]*")
    if not 0 < len(beat.name) <= MAX_NAME or not printable.fullmatch(beat.name):
        return f"name must be 1 to {MAX_NAME} printable characters"
    if not 0 < len(beat.version) <= MAX_VERSION or not printable.fullmatch(beat.version):
        return f"version must be 1 to {MAX_VERSION} printable characters"
    unknown = sorted(set(beat.capabilities) - set(REPLICATE_QUEUES))
    if unknown or not beat.capabilities or len(set(beat.capabilities)) != len(beat.capabilities):
        return f"capabilities must be distinct names among {', '.join(REPLICATE_QUEUES)}"
    if not 1 <= beat.slots <= max_slots:
        return f"slots {beat.slots} not in [1, {max_slots}] (WORKERPOOL_WORKER_MAX_SLOTS)"
    if not 0 <= beat.busy_slots <= beat.slots:
        return f"busy_slots {beat.busy_slots} not in [0, slots]"
    if beat.cpus is not None and not 0 <= beat.cpus <= MAX_CPUS:
        return f"cpus {beat.cpus} not in [0, {MAX_CPUS}]"
    if beat.memory_mb is not None and not 0 <= beat.memory_mb <= MAX_MEMORY_MB:
        return f"memory_mb {beat.memory_mb} not in [0, {MAX_MEMORY_MB}]"
    return None


# ---- messages ----------------------------------------------------------------------------------
P = TypeVar("P", bound=Payload)


@dataclass(frozen=True)
class Message(Generic[P]):
    """A message: its Celery task name and the payload it carries."""

    name: str
    payload: type[P]

    def parse(self, data: Any) -> P:
        """The payload of an unsigned message (scheduler -> worker, a node to itself)."""
        return self.payload.from_wire(data)

    def open(self, data: Any, domain: Domain) -> Signed[P]:
        """The payload of a signed envelope (worker -> scheduler) and who signed it.

        Refused (:class:`Refused`, nothing applied) when the envelope is not one, was
        signed for another message, chain or pool, or by another key than the worker it
        names (in the envelope and in the payload). Only the signature is checked here:
        the time and the nonce are the receiver's (:func:`check_time`, :class:`Nonces`).
        """
        if not isinstance(data, Mapping):
            raise Refused(MALFORMED, f"expected a signed envelope, got {type(data).__name__}")
        claimed = data.get("worker")
        claimed = claimed if isinstance(claimed, str) else ""
        unknown = sorted(map(str, set(data) - _ENVELOPE_FIELDS))
        if unknown:
            raise Refused(MALFORMED, f"unknown envelope field(s) {', '.join(unknown)}", claimed)
        if data.get("v") != ENVELOPE_VERSION:
            raise Refused(MALFORMED, f"envelope version {data.get('v')!r} is not 1", claimed)
        if data.get("kind") != self.name:
            raise Refused(MALFORMED, f"an envelope of {data.get('kind')!r}", claimed)
        if not is_address(claimed):
            raise Refused(MALFORMED, "worker is not an address", claimed)
        body, nonce, issued, sig = (data.get(k) for k in ("body", "nonce", "issuedAt", "sig"))
        if not isinstance(body, str) or len(body) > MAX_BODY:
            raise Refused(MALFORMED, f"body must be a string of at most {MAX_BODY}", claimed)
        if not isinstance(nonce, str) or not _HEX32.fullmatch(nonce):
            raise Refused(MALFORMED, "nonce must be 32 bytes of hex", claimed)
        if isinstance(issued, bool) or not isinstance(issued, int) or not 0 <= issued < 2**63:
            raise Refused(MALFORMED, "issuedAt must be a Unix time in seconds", claimed)
        if not isinstance(sig, str) or not _HEX65.fullmatch(sig):
            raise Refused(MALFORMED, "sig must be 65 bytes of hex", claimed)
        digest = message_digest(
            domain, self.name, claimed, keccak(body.encode()), bytes.fromhex(nonce[2:]), issued
        )
        signer = recover_signer(digest, bytes.fromhex(sig[2:]))
        if signer is None:
            raise Refused(BAD_SIGNATURE, "the signature does not recover", claimed)
        if signer != claimed.lower():
            raise Refused(
                WRONG_SIGNER,
                f"signed by {signer} (or for another message, chain or pool)",
                claimed,
            )
        try:
            payload = self.payload.from_wire(json.loads(body))
        except ValueError as exc:  # MessageError and JSONDecodeError
            raise Refused(MALFORMED, str(exc), claimed) from None
        named = getattr(payload, "worker", claimed)
        if str(named).lower() != signer:
            raise Refused(WRONG_SIGNER, f"signed by {signer}, the payload names {named}", claimed)
        return Signed(payload, signer, nonce.lower(), issued)


TICK_TASK = "scheduler.tick"  # beat -> scheduler: listen, initialize, plan, reconcile
LISTEN_TASK = "scheduler.listen"  # beat -> scheduler, between ticks: new deals only
RUN_REPLICATE = Message("workers.run_replicate", ReplicateJob)
AUTHORIZE = Message("scheduler.authorize", AuthorizeRequest)
REPORT = Message("scheduler.replicate_update", ReplicateReport)
HEARTBEAT = Message("scheduler.worker_heartbeat", Heartbeat)
CONTRIBUTE = Message("workers.contribute", TaskRef)
REVEAL = Message("workers.reveal", TaskRef)
UPLOAD = Message("workers.upload", TaskRef)
ABORT = Message("workers.abort", AbortRequest)

SCHEDULER_TASKS = (TICK_TASK, LISTEN_TASK, AUTHORIZE.name, REPORT.name, HEARTBEAT.name)


class Messenger:
    """Sends the messages above on a Celery app (anything with Celery's ``send_task``). A
    worker node's messenger holds its :class:`MessageSigner`: every message to the scheduler
    is sealed with it."""

    HEARTBEAT_EXPIRES = 60  # a heartbeat older than this says nothing

    def __init__(self, celery: Any, signer: MessageSigner | None = None) -> None:
        self.celery = celery
        self.signer = signer

    def _send(self, message: Message[P], payload: P, queue: str, **options: Any) -> Any:
        return self._send_args(message.name, [payload.to_wire()], queue, **options)

    def _send_sealed(self, message: Message[P], payload: P, **options: Any) -> Any:
        envelope = self.seal(message, payload)
        return self._send_args(message.name, [envelope], SCHEDULER_QUEUE, **options), envelope

    def _send_args(self, name: str, args: list[Any], queue: str, **options: Any) -> Any:
        acquire = getattr(self.celery, "producer_or_acquire", None)
        if acquire is None:  # a stand-in for Celery (testing/celery.py)
            return self.celery.send_task(name, args=args, queue=queue, **options)
        with acquire() as producer:
            try:
                return self.celery.send_task(
                    name, args=args, queue=queue, producer=producer, **options
                )
            except AttributeError as exc:
                # kombu may hand out a pooled producer whose channel a failed connection
                # closed (after a cut link: "'NoneType' object has no attribute 'client'").
                # Drop that connection (the pool opens it again on its next use) and send
                # once more, on a connection of its own.
                log.warning("%s: broken broker connection (%s): sending again", name, exc)
                stale = getattr(producer, "__connection__", None)
                if stale is not None:
                    with contextlib.suppress(Exception):
                        stale.collect()
        with self.celery.connection_for_write() as connection:
            return self.celery.send_task(
                name, args=args, queue=queue, connection=connection, **options
            )

    def seal(self, message: Message[P], payload: P) -> dict[str, Any]:
        if self.signer is None:
            raise RuntimeError(f"{message.name}: this messenger has no worker key to sign with")
        return self.signer.seal(message, payload)

    # scheduler -> workers
    def run_replicate(self, job: ReplicateJob, queue: str) -> None:
        self._send(RUN_REPLICATE, job, queue)

    def reveal(self, worker: str, taskid: str) -> None:
        self._send(REVEAL, TaskRef(taskid), worker_queue(worker))

    def upload(self, worker: str, taskid: str) -> None:
        self._send(UPLOAD, TaskRef(taskid), worker_queue(worker))

    def abort(self, worker: str, request: AbortRequest) -> None:
        self._send(ABORT, request, worker_queue(worker))

    # a node to itself
    def contribute(self, worker: str, taskid: str) -> None:
        self._send(CONTRIBUTE, TaskRef(taskid), worker_queue(worker))

    # workers -> scheduler, signed
    def report(self, report: ReplicateReport) -> None:
        self._send_sealed(REPORT, report)

    def heartbeat(self, heartbeat: Heartbeat) -> dict[str, Any]:
        """Send the heartbeat; returns the signed envelope sent (the node also keeps it in
        Redis as its proof of life)."""
        _, envelope = self._send_sealed(HEARTBEAT, heartbeat, expires=self.HEARTBEAT_EXPIRES)
        return dict(envelope)

    def authorize(self, request: AuthorizeRequest, timeout: float) -> Authorization:
        """Ask the scheduler and wait for its answer (the Redis result backend). AnswerLost
        when no answer came back (the broker out of reach, no answer within ``timeout``):
        the scheduler may have granted it all the same."""
        try:
            result, _ = self._send_sealed(AUTHORIZE, request)
            try:
                answer = result.get(timeout=timeout, disable_sync_subtasks=False)
            finally:
                with contextlib.suppress(Exception):
                    result.forget()
        except Exception as exc:
            raise AnswerLost(f"{type(exc).__name__}: {exc}") from exc
        return Authorization.from_wire(answer)


# ---- signed envelopes (worker -> scheduler) ----------------------------------------------------
ENVELOPE_VERSION = 1
MAX_BODY = 64 * 1024  # characters of a payload's JSON
# a status report may wait in Redis while the scheduler is down, so it has no short age bound;
# past this it is refused, and its nonce is remembered as long as it could be accepted (one
# Redis key per report taken). A report lost this way is repaired from the chain by the tick
# (contributions, reveals, finalized tasks); a report replayed after it was forgotten finds
# its replicate there already and changes nothing.
REPORT_MAX_AGE = 2 * 86400
_ENVELOPE_FIELDS = frozenset({"v", "kind", "worker", "body", "nonce", "issuedAt", "sig"})
_HEX32 = re.compile(r"0x[0-9a-fA-F]{64}")
_HEX65 = re.compile(r"0x[0-9a-fA-F]{130}")
_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
MESSAGE_TYPE = (
    "WorkerMessage(string kind,address worker,bytes32 bodyHash,bytes32 nonce,uint64 issuedAt)"
)
_MESSAGE_TYPEHASH = keccak(text=MESSAGE_TYPE)
DOMAIN_NAME, DOMAIN_VERSION = "workerpool", "1"

# why a message was refused: logged with the address it claims, counted in Redis by reason
# (the API shows the counts in /metrics as workerpool_messages_refused{message, reason})
MALFORMED = "malformed"  # not a signed envelope of this message, or a payload of wrong types
BAD_SIGNATURE = "bad_signature"  # the signature recovers no key
WRONG_SIGNER = "wrong_signer"  # signed by another key than the worker it names
STALE = "stale"  # older than WORKERPOOL_MESSAGE_MAX_AGE (reports: REPORT_MAX_AGE)
FUTURE = "future"  # dated ahead of the scheduler's clock by more than that
REPLAY = "replay"  # its nonce was already used
NOT_ALLOWED = "not_allowed"  # signer not in WORKERPOOL_WORKER_ALLOWLIST
BAD_HEARTBEAT = "bad_heartbeat"  # values out of their bounds
UNKNOWN_REPLICATE = "unknown_replicate"  # the signer holds no replicate of that task
NOT_UPLOADER = "not_uploader"  # an upload report from a worker not asked to upload
BAD_RESULT_LINK = "bad_result_link"  # a result link that is not one
BAD_STATUS = "bad_status"  # a status a worker may not report (COMPLETED it did not finalize)
NOT_ON_CHAIN = "not_on_chain"  # the chain does not show what the report claims
LOST_WORKER = "lost_worker"  # progress reported by a worker judged LOST, with no heartbeat since
REASONS = (
    MALFORMED,
    BAD_SIGNATURE,
    WRONG_SIGNER,
    STALE,
    FUTURE,
    REPLAY,
    NOT_ALLOWED,
    BAD_HEARTBEAT,
    UNKNOWN_REPLICATE,
    NOT_UPLOADER,
    BAD_RESULT_LINK,
    BAD_STATUS,
    NOT_ON_CHAIN,
    LOST_WORKER,
)
_ENVELOPE = (MALFORMED, BAD_SIGNATURE, WRONG_SIGNER, STALE, FUTURE, REPLAY)
# the reasons each message can be refused for (/metrics shows each pair, 0 until one is)
REFUSALS: dict[str, tuple[str, ...]] = {
    AUTHORIZE.name: (*_ENVELOPE, NOT_ALLOWED),
    HEARTBEAT.name: (*_ENVELOPE, NOT_ALLOWED, BAD_HEARTBEAT),
    REPORT.name: (
        *_ENVELOPE,
        UNKNOWN_REPLICATE,
        NOT_UPLOADER,
        BAD_RESULT_LINK,
        BAD_STATUS,
        NOT_ON_CHAIN,
        LOST_WORKER,
    ),
}


class Refused(MessageError):
    """A worker's message refused for ``reason`` (one of :data:`REASONS`); ``claimed`` is
    the worker it says it comes from (not proven)."""

    def __init__(self, reason: str, detail: str, claimed: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.claimed = claimed


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain of a pool's messages: a signature is good for this chain and this
    workerpool only."""

    chain_id: int
    pool: str

    @functools.cached_property
    def separator(self) -> bytes:
        return keccak(
            _DOMAIN_TYPEHASH
            + keccak(text=DOMAIN_NAME)
            + keccak(text=DOMAIN_VERSION)
            + self.chain_id.to_bytes(32, "big")
            + bytes(12)
            + bytes.fromhex(to_checksum_address(self.pool)[2:])
        )

    def typed_data(self) -> dict[str, Any]:
        """The domain as eth_account's ``encode_typed_data`` takes it (tests, tools)."""
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.pool),
        }


def message_digest(
    domain: Domain, kind: str, worker: str, body_hash: bytes, nonce: bytes, issued_at: int
) -> bytes:
    """The EIP-712 digest of ``WorkerMessage(kind, worker, bodyHash, nonce, issuedAt)`` in
    ``domain`` (what a wallet's ``eth_signTypedData_v4`` signs; the type hash and the domain
    separator are computed once)."""
    struct = keccak(
        _MESSAGE_TYPEHASH
        + keccak(text=kind)
        + bytes(12)
        + bytes.fromhex(worker[2:])
        + body_hash
        + nonce
        + issued_at.to_bytes(32, "big")
    )
    return keccak(b"\x19\x01" + domain.separator + struct)


def recover_signer(digest: bytes, signature: bytes) -> str | None:
    """The address (lower case) whose key signed ``digest``, or None."""
    if len(signature) != 65 or signature[64] not in (0, 1, 27, 28):
        return None
    v = signature[64] - 27 if signature[64] >= 27 else signature[64]
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes([v]), digest, hasher=None
        )
    except Exception:  # coincurve raises ValueError or its own errors on a bad signature
        return None
    return "0x" + keccak(public.format(compressed=False)[1:])[-20:].hex()


class MessageSigner:
    """A worker node's wallet sealing its messages to the scheduler."""

    def __init__(self, private_key: str | bytes, domain: Domain) -> None:
        raw = (
            bytes.fromhex(private_key.removeprefix("0x"))
            if isinstance(private_key, str)
            else (bytes(private_key))
        )
        self._key = coincurve.PrivateKey(raw)
        public = self._key.public_key.format(compressed=False)[1:]
        self.address = to_checksum_address(keccak(public)[-20:])
        self.domain = domain

    def seal(self, message: Message[P], payload: P, *, now: float | None = None) -> dict[str, Any]:
        body = json.dumps(
            payload.to_wire(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        nonce = os.urandom(32)
        issued = int(time.time() if now is None else now)
        digest = message_digest(
            self.domain, message.name, self.address, keccak(body.encode()), nonce, issued
        )
        sig = self._key.sign_recoverable(digest, hasher=None)
        return {
            "v": ENVELOPE_VERSION,
            "kind": message.name,
            "worker": self.address,
            "body": body,
            "nonce": "0x" + nonce.hex(),
            "issuedAt": issued,
            "sig": "0x" + sig[:64].hex() + f"{sig[64] + 27:02x}",
        }


@dataclass(frozen=True)
class Signed(Generic[P]):
    """A payload whose envelope verified, with the address that signed it (lower case)."""

    payload: P
    signer: str
    nonce: str
    issued_at: int


def check_time(signed: Signed[Any], now: float, max_age: float, skew: float) -> None:
    """Refuse a message issued more than ``max_age`` seconds ago, or dated more than ``skew``
    seconds ahead of ``now``."""
    if signed.issued_at > now + skew:
        raise Refused(FUTURE, f"issued {signed.issued_at - now:.0f}s in the future", signed.signer)
    if now - signed.issued_at > max_age:
        raise Refused(STALE, f"issued {now - signed.issued_at:.0f}s ago", signed.signer)


class Nonces:
    """The nonces of the messages taken, in Redis (``redis`` None: none kept, tests)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def claim(self, signed: Signed[Any], ttl: float) -> bool:
        """Note the nonce as used for ``ttl`` seconds; False when it already was."""
        if self.redis is None:
            return True
        key = keys.message_nonce(signed.signer, signed.nonce)
        return bool(self.redis.set(key, signed.issued_at, nx=True, ex=max(1, int(ttl) + 1)))

    def used(self, signed: Signed[Any]) -> bool:
        if self.redis is None:
            return False
        return bool(self.redis.exists(keys.message_nonce(signed.signer, signed.nonce)))


class Refusals:
    """Refused messages counted by message and reason in one Redis hash: the API, another
    process, reads it for ``/metrics``."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    def count(self, message: str, exc: Refused) -> None:
        """Log the refusal (with the address the message claims) and count it."""
        log.warning(
            "refused %s claiming %s: %s",
            message,
            exc.claimed or "(no worker)",
            exc,
        )
        if self.redis is None:
            return
        try:
            self.redis.hincrby(keys.MESSAGES_REFUSED, f"{message}|{exc.reason}", 1)
        except Exception as err:  # Redis down: the log line stays
            log.warning("could not count the refusal: %s", err)

    def read(self) -> dict[tuple[str, str], int]:
        """(message, reason) -> count; fields that are not counts are skipped."""
        raw = self.redis.hgetall(keys.MESSAGES_REFUSED) or {}
        counts: dict[tuple[str, str], int] = {}
        for field, value in raw.items():
            name = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
            message, _, reason = name.partition("|")
            try:
                counts[(message, reason)] = int(value)
            except (TypeError, ValueError):
                continue
        return counts


def heartbeat_time(raw: Any, address: str, domain: Domain) -> int | None:
    """When the node at ``address`` issued the signed heartbeat ``raw`` (its liveness key's
    value), or None when ``raw`` is not one of its heartbeats."""
    try:
        data = json.loads(raw)
        signed = HEARTBEAT.open(data, domain)
    except (TypeError, ValueError):
        return None
    return signed.issued_at if signed.signer == address.lower() else None


# ---- the Celery app ----------------------------------------------------------------------------
# seconds between tries 0, 1, 2, 3, 4, 5, 5, ... : about 2 minutes of waiting in all
PUBLISH_RETRY = {"max_retries": 30, "interval_start": 0, "interval_step": 1, "interval_max": 5}


def make_celery(settings: Settings, name: str = "workerpool") -> Celery:
    """A process's one Celery app, configured as every service expects."""
    # how Redis is reached (one server or Sentinel; password, TLS; timeouts, keepalive,
    # health checks for a link that may fail): pool/broker.py. The result backend only
    # carries authorization answers (AUTHORIZE).
    reach = broker.celery_options(settings)
    transport = reach.pop("broker_transport_options")
    app = Celery(name, broker=reach.pop("broker_url"), backend=reach.pop("result_backend"))
    app.conf.update(
        **reach,
        task_queues=[Queue(SCHEDULER_QUEUE), *(Queue(q) for q in REPLICATE_QUEUES.values())],
        task_default_queue=SCHEDULER_QUEUE,
        task_routes={task: {"queue": SCHEDULER_QUEUE} for task in SCHEDULER_TASKS},
        task_ignore_result=True,
        result_expires=3600,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # acks_late on Redis: an unacked message is redelivered after this many seconds,
        # so it must exceed the longest replicate (XL category: 10 * 36000 s final deadline).
        broker_transport_options={**transport, "visibility_timeout": 12 * 3600},
        broker_connection_retry_on_startup=True,
        # a node on a far host keeps trying while its link or the broker is down (the
        # default gives up after 100 tries and the process exits)
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        # a message sent while the link or the broker is down waits for it, about two
        # minutes (more than WORKER_LOST_TIMEOUT's default, a Sentinel failover): a node
        # cut for less loses no report, one cut for longer is judged lost and re-planned
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY,
        # a replicate keeps running while the broker is unreachable: its result is on this
        # host and its reports wait for the connection (see docs/operations.md)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_serializer="json",
        accept_content=["json"],
        enable_utc=True,
        worker_hijack_root_logger=False,
    )
    return app
