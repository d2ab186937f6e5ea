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
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Self, TypedDict, TypeVar

from celery import Celery
from kombu import Queue

from poco.orders import ZERO_ADDRESS
from poco.tags import tag_to_int
from pool.settings import Settings
from pool.states import ReplicateStatus, ReplicateStatusCause

# ---- queues ------------------------------------------------------------------------------------
SCHEDULER_QUEUE = "scheduler"
REPLICATE_QUEUES = {
    "standard": "replicates.standard",
    "gpu": "replicates.gpu",
    "tee-scone": "replicates.tee-scone",
    "tee-gramine": "replicates.tee-gramine",
}
QUEUE_CAPABILITY = {queue: name for name, queue in REPLICATE_QUEUES.items()}


def worker_queue(address: str) -> str:
    """The queue only one worker node consumes (contribute, reveal and upload requests)."""
    return f"worker.{address.lower()}"


TEE, SCONE, GRAMINE, GPU = 1 << 0, 1 << 1, 1 << 2, 1 << 8


def queue_for_tag(tag: str | bytes | int) -> str:
    """The replicate queue a deal's tag selects (TEE framework first, then GPU)."""
    value = tag_to_int(tag)
    if value & TEE and value & SCONE:
        return REPLICATE_QUEUES["tee-scone"]
    if value & TEE and value & GRAMINE:
        return REPLICATE_QUEUES["tee-gramine"]
    if value & GPU:
        return REPLICATE_QUEUES["gpu"]
    return REPLICATE_QUEUES["standard"]


# ---- payloads ----------------------------------------------------------------------------------
class MessageError(ValueError):
    """A message whose payload is not what its name promises: refused, nothing applied."""


class Payload:
    """A message body: a frozen dataclass sent as one JSON object of its fields (a field left
    at None is not sent)."""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            wire[f.name] = list(value) if isinstance(value, tuple) else value
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        """The payload ``data`` carries, checked field by field."""
        if not isinstance(data, Mapping):
            raise MessageError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
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
    result_digest: str | None = None  # COMPUTED
    result_link: str | None = None  # RESULT_UPLOADED, or COMPLETED with finalized
    callback_data: str | None = None
    finalized: bool = False  # COMPLETED by the worker's contributeAndFinalize
    upload_failed: bool = False  # REVEALED again: the upload asked of it failed
    # ABORTED because of the node itself (its Docker engine, the registry as seen from it,
    # its disk): planned on another node, and counted towards pausing this one
    node_fault: bool = False


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
    result_digest: str | None
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


# ---- messages ----------------------------------------------------------------------------------
P = TypeVar("P", bound=Payload)


@dataclass(frozen=True)
class Message(Generic[P]):
    """A message: its Celery task name and the payload it carries."""

    name: str
    payload: type[P]

    def parse(self, data: Any) -> P:
        return self.payload.from_wire(data)


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
    """Sends the messages above on a Celery app (anything with Celery's ``send_task``)."""

    HEARTBEAT_EXPIRES = 60  # a heartbeat older than this says nothing

    def __init__(self, celery: Any) -> None:
        self.celery = celery

    def _send(self, message: Message[P], payload: P, queue: str, **options: Any) -> Any:
        return self.celery.send_task(message.name, args=[payload.to_wire()], queue=queue, **options)

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

    # workers -> scheduler
    def report(self, report: ReplicateReport) -> None:
        self._send(REPORT, report, SCHEDULER_QUEUE)

    def heartbeat(self, heartbeat: Heartbeat) -> None:
        self._send(HEARTBEAT, heartbeat, SCHEDULER_QUEUE, expires=self.HEARTBEAT_EXPIRES)

    def authorize(self, request: AuthorizeRequest, timeout: float) -> Authorization:
        """Ask the scheduler and wait for its answer (the Redis result backend)."""
        result = self._send(AUTHORIZE, request, SCHEDULER_QUEUE)
        try:
            answer = result.get(timeout=timeout, disable_sync_subtasks=False)
        finally:
            result.forget()
        return Authorization.from_wire(answer)


# ---- the Celery app ----------------------------------------------------------------------------
def make_celery(settings: Settings, name: str = "workerpool") -> Celery:
    """A process's one Celery app, configured as every service expects."""
    # the result backend only carries authorization answers (AUTHORIZE)
    app = Celery(name, broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
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
        broker_transport_options={"visibility_timeout": 12 * 3600},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        enable_utc=True,
        worker_hijack_root_logger=False,
    )
    return app
