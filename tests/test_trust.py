"""Trust nothing a worker node says: a rogue process on the pool's Redis, with no worker key
or with one of its own, sends every forgery it can during a trust-2 deal run by two honest
nodes, and the deal completes with the honest result; the public API shows nothing a lazy
worker could use before the reveal; Redis with a password and TLS carries a whole deal.
Devnet, real redis-server (the pool's, and one started here with TLS), worker nodes as real
processes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import require_service
from devnet_fixtures import DevnetHandle, free_port
from flask.testing import FlaskClient
from pool_fixtures import RunningPool, pool_running
from tls_support import make_certs

from api.app import create_app
from devnet.requester import deal_params
from poco.results import parse_result_link, result_link
from poco.types import ChainTaskStatus, ContributionStatus
from pool import keys
from pool.broker import redis_client
from pool.messages import (
    AUTHORIZE,
    HEARTBEAT,
    REPORT,
    REVEAL,
    SCHEDULER_QUEUE,
    UPLOAD,
    AuthorizeRequest,
    Heartbeat,
    Message,
    Messenger,
    Refusals,
    Refused,
    ReplicateReport,
    TaskRef,
    make_celery,
    worker_queue,
)
from pool.states import ReplicateStatus
from testing.workers import SigningWorker

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

POOL_PRICE = 10_000_000
ROGUE_LINK = result_link("ipfs", "/ipfs/QmRogueRogueRogueRogueRogueRogueRogueRogueRogue")
TOKEN = "trust-test-bearer-token"
R = ReplicateStatus


def _completed(doc: dict[str, Any]) -> bool:
    return doc.get("status") == "COMPLETED"


class Rogue:
    """A process that can write to the pool's Redis: it sends Celery messages like anyone on
    the broker, reads the keys the nodes write, and takes messages out of the scheduler's
    queue to send them again. It signs with a key of its own (a real worker's, or a fresh
    one that no pool knows)."""

    def __init__(self, pool: RunningPool, key: str | bytes | None = None) -> None:
        settings = pool.scheduler.settings
        self.pool = pool
        self.app = make_celery(settings, "rogue")
        self.redis = redis_client(settings)
        self.me = SigningWorker(key or os.urandom(32), pool.scheduler.ctx.domain, "rogue")
        self.address = self.me.address.lower()
        self.stolen: list[bytes] = []
        self.lock = threading.Lock()
        self.replayed = 0
        self.rounds = 0

    def send(self, message: Message[Any], body: Any, queue: str = SCHEDULER_QUEUE) -> None:
        self.app.send_task(message.name, args=[body], queue=queue)

    def speaking_for(self, worker: str, message: Message[Any], payload: Any) -> dict[str, Any]:
        """A message naming ``worker`` (in the envelope and the payload), signed by the rogue:
        the only signature it can make."""
        return {**self.me.signer.seal(message, payload), "worker": worker}

    def steal(self, stop: threading.Event) -> None:
        """Wait on the scheduler's queue beside the scheduler (Redis hands each message to
        one of the clients waiting), put each message taken back at once so that it is still
        delivered, and keep a copy of the honest status reports among them (a signature
        anyone can check) to send again later."""
        domain = self.pool.scheduler.ctx.domain
        stealer = redis_client(self.pool.scheduler.settings)
        seen: set[str] = set()
        while not stop.is_set():
            taken = stealer.brpop([SCHEDULER_QUEUE], timeout=1)
            if taken is None:
                continue
            raw = taken[1]
            stealer.rpush(SCHEDULER_QUEUE, raw)  # back at the end the scheduler takes from
            stop.wait(0.02)  # (the scheduler, waiting there, takes it)
            message = json.loads(raw)
            tag = str(message["properties"]["delivery_tag"])
            if message["headers"]["task"] != REPORT.name or tag in seen:
                continue
            seen.add(tag)
            (envelope,), _, _ = json.loads(base64.b64decode(message["body"]))
            try:
                REPORT.open(envelope, domain)
            except Refused:
                continue  # (a forgery: nobody takes it anyway)
            with self.lock:
                if len(self.stolen) < 20:
                    self.stolen.append(raw)

    def replay_stolen(self) -> None:
        with self.lock:
            for raw in self.stolen:
                self.redis.lpush(SCHEDULER_QUEUE, raw)
                self.replayed += 1
            self.stolen.clear()

    def forge_for(self, taskids: list[str], honest: list[str]) -> None:
        """One round of every forgery about the honest workers' tasks."""
        for taskid in taskids:
            for worker in honest:
                # the honest worker's result link replaced by the rogue's
                upload = ReplicateReport(taskid, worker, R.RESULT_UPLOADED, result_link=ROGUE_LINK)
                self.send(REPORT, self.speaking_for(worker, REPORT, upload))
                self.send(REPORT, upload.to_wire())  # unsigned, as messages used to be
                # a task said finalized by the worker (contributeAndFinalize) that is not
                done = ReplicateReport(
                    taskid, worker, R.COMPLETED, result_link=ROGUE_LINK, finalized=True
                )
                self.send(REPORT, self.speaking_for(worker, REPORT, done))
                # a contribution and a reveal it never made
                for status in (R.CONTRIBUTED, R.REVEALED):
                    claim = ReplicateReport(taskid, worker, status)
                    self.send(REPORT, self.speaking_for(worker, REPORT, claim))
                # a replicate reserved in the worker's name
                ask = AuthorizeRequest(taskid, worker)
                self.send(AUTHORIZE, self.speaking_for(worker, AUTHORIZE, ask))
                # the honest node asked to publish its result early, and to reveal
                self.send(UPLOAD, TaskRef(taskid).to_wire(), worker_queue(worker))
                self.send(REVEAL, TaskRef(taskid).to_wire(), worker_queue(worker))
        for worker in honest:
            # heartbeats for the worker: absurd slots, signed by the rogue; unsigned
            absurd = Heartbeat(worker, "rogue", ("standard",), 10**6, 0, "x")
            self.send(HEARTBEAT, self.speaking_for(worker, HEARTBEAT, absurd))
            self.send(HEARTBEAT, {**absurd.to_wire(), "slots": "x"})
            # the worker's own signed heartbeat, read where the node keeps it, sent again
            seen = self.redis.get(keys.node_seen(worker))
            if seen is not None:
                self.send(HEARTBEAT, json.loads(seen))
        # and absurd slots in the rogue's own name
        self.send(HEARTBEAT, self.me.heartbeat(slots=10**6))
        if self.rounds % 2:
            self.replay_stolen()
        self.rounds += 1

    @contextmanager
    def running(self, round_: Callable[[], None], period: float = 0.5) -> Iterator[None]:
        """Run ``round_`` every ``period`` seconds, and steal from the scheduler's queue,
        until the block ends."""
        stop = threading.Event()
        failures: list[BaseException] = []

        def loop() -> None:
            while not stop.is_set():
                try:
                    round_()
                except Exception as exc:  # the test fails on it below
                    failures.append(exc)
                    return
                stop.wait(period)

        def stealing() -> None:
            try:
                self.steal(stop)
            except Exception as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=loop, daemon=True, name="rogue"),
            threading.Thread(target=stealing, daemon=True, name="rogue-stealer"),
        ]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            self.replay_stolen()
            assert not failures, failures


def refused(pool: RunningPool) -> dict[tuple[str, str], int]:
    counts = Refusals(redis_client(pool.scheduler.settings)).read()
    return {(m.rpartition(".")[2], r): n for (m, r), n in counts.items()}


def wait_refused(pool: RunningPool, wanted: set[tuple[str, str]], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wanted <= set(refused(pool)):
            return
        time.sleep(0.5)
    raise AssertionError(f"not counted: {sorted(wanted - set(refused(pool)))}: {refused(pool)}")


def assert_completed_with_the_honest_link(pool: RunningPool, taskids: list[str]) -> None:
    client = pool.devnet.client
    for taskid in taskids:
        chain = client.view_task(taskid)
        assert chain.status == ChainTaskStatus.COMPLETED
        doc = pool.store.task(taskid) or {}
        link = chain.results.decode()
        assert link == doc["resultLink"] != ROGUE_LINK
        storage, location = parse_result_link(link)
        assert storage == "ipfs" and location.startswith("/ipfs/Qm") and "Rogue" not in location
        # the link is the one the worker asked to upload published, after it revealed
        uploader = pool.store.replicate(taskid, doc["uploader"]) or {}
        assert uploader["resultLink"] == link
        assert client.view_contribution(taskid, doc["uploader"]).status == (
            ContributionStatus.PROVED
        )
        for rep in pool.store.replicates_of(taskid):
            assert rep.get("resultLink") in (None, link)


def assert_no_route_answers_500(api: FlaskClient, pool: RunningPool, taskids: list[str]) -> None:
    deal = (pool.store.task(taskids[0]) or {})["chainDealId"]
    paths = [
        "/",
        "/healthz",
        "/metrics",
        "/api/v1/pool",
        "/api/v1/workers",
        "/api/v1/deals",
        f"/api/v1/deals/{deal}",
        "/api/v1/tasks",
        "/api/v1/orders",
        "/workerpoolorders",
        *(f"/api/v1/tasks/{t}" for t in taskids),
        *(f"/api/v1/workers/{w['address']}" for w in pool.store.all_workers()),
    ]
    for path in paths:
        response = api.get(path)
        assert response.status_code < 500, (path, response.status_code, response.text[:500])


def test_a_rogue_without_a_worker_key_changes_nothing_of_a_trust2_deal(
    running_pool: RunningPool,
) -> None:
    pool = running_pool
    honest = [pool.worker_address(0), pool.worker_address(1)]
    for n in (0, 1):
        pool.start_worker(n)
    rogue = Rogue(pool)
    deal = pool.match(volume=2, trust=2, workerpoolprice=POOL_PRICE)
    taskids = deal.taskids()
    # When a rogue process on the pool's Redis sends every forgery it can, all through the deal
    with rogue.running(lambda: rogue.forge_for(taskids, honest)):
        pool.wait_tasks(taskids, _completed, timeout=180)
    assert rogue.replayed, "the rogue stole no honest report to send again"

    # Then every task is COMPLETED on chain with the result link the honest uploader gave
    assert_completed_with_the_honest_link(pool, taskids)
    # And the fleet shows the honest nodes only, with the slots they declared
    workers = {w["address"]: w for w in pool.store.all_workers()}
    assert set(workers) == set(honest)
    assert all(w["slots"] == 2 and w["name"].startswith("test-worker-") for w in workers.values())
    # And no replicate of anyone else, nor a second one of an honest worker's
    for taskid in taskids:
        reps = pool.store.replicates_of(taskid)
        assert {r["worker"] for r in reps} <= set(honest) and len(reps) == len(
            {r["worker"] for r in reps}
        )
    # And each forgery was counted under its reason
    wait_refused(
        pool,
        {
            ("replicate_update", "wrong_signer"),  # a link, a COMPLETED, claims in their name
            ("replicate_update", "malformed"),  # the unsigned report
            ("replicate_update", "replay"),  # a report taken out of the queue, sent again
            ("authorize", "wrong_signer"),
            ("worker_heartbeat", "wrong_signer"),
            ("worker_heartbeat", "malformed"),
            ("worker_heartbeat", "bad_heartbeat"),  # absurd slots in its own name
            ("worker_heartbeat", "replay"),  # a node's signed heartbeat sent again
        },
    )
    # And /metrics shows them, and no route of the API answers 500
    app = create_app(pool.scheduler.settings, pool.store)
    api = app.test_client()
    metrics = api.get("/metrics").text
    assert 'workerpool_messages_refused{message="replicate_update",reason="wrong_signer"}' in (
        metrics
    )
    assert_no_route_answers_500(api, pool, taskids)
    listed = api.get("/api/v1/workers").get_json()["items"]
    assert {w["address"] for w in listed} == set(honest)


def test_a_rogue_with_a_worker_key_of_its_own_can_only_speak_for_itself(
    running_pool: RunningPool,
) -> None:
    pool = running_pool
    honest = [pool.worker_address(0), pool.worker_address(1)]
    rogue = Rogue(pool, pool.devnet.worker_key(2))  # a real worker of the devnet
    deal = pool.match(volume=2, trust=2, workerpoolprice=POOL_PRICE)
    taskids = deal.taskids()
    pool.wait_tasks(taskids, lambda d: d.get("status") == "RUNNING", timeout=60)
    first = taskids[0]
    # Given the rogue joined the pool as itself (a valid heartbeat) and took a replicate of
    # the first task before any honest node came
    rogue.send(HEARTBEAT, rogue.me.heartbeat())
    deadline = time.monotonic() + 30
    while pool.store.worker(rogue.address) is None:
        assert time.monotonic() < deadline, "the rogue's own heartbeat was not taken"
        time.sleep(0.2)
    asked = Messenger(rogue.app, rogue.me.signer).authorize(
        AuthorizeRequest(first, rogue.address), 30
    )
    assert asked.granted

    # When it claims, in its own name, what it never did: a contribution, a reveal, a
    # finalized task, an upload of its own link; and speaks for the honest workers
    def round_() -> None:
        for status, extra in (
            ("CONTRIBUTED", {}),
            ("REVEALED", {}),
            ("COMPLETED", {"finalized": True, "result_link": ROGUE_LINK}),
            ("RESULT_UPLOADED", {"result_link": ROGUE_LINK}),
        ):
            rogue.send(REPORT, rogue.me.report(first, status, **extra))
        own = rogue.me.heartbeat(slots=1000)  # absurd slots, its own name
        rogue.send(HEARTBEAT, own)
        for taskid in taskids:
            for worker in honest:
                upload = ReplicateReport(taskid, worker, R.RESULT_UPLOADED, result_link=ROGUE_LINK)
                rogue.send(REPORT, rogue.speaking_for(worker, REPORT, upload))
        envelope = rogue.me.report(first, "STARTING")  # a valid message of its own, twice
        rogue.send(REPORT, envelope)
        rogue.send(REPORT, envelope)
        rogue.send(HEARTBEAT, rogue.me.heartbeat())  # it stays ALIVE meanwhile

    with rogue.running(round_, period=1.0):
        wait_refused(
            pool,
            {
                ("replicate_update", "not_uploader"),
                ("replicate_update", "wrong_signer"),
                ("replicate_update", "replay"),
                ("worker_heartbeat", "bad_heartbeat"),
                # claims the chain never confirms: refused after looking again for 35 s
                ("replicate_update", "not_on_chain"),
            },
            timeout=120,
        )
    # And then leaves (no more heartbeats), while two honest nodes serve the deal
    for n in (0, 1):
        pool.start_worker(n)
    pool.wait_tasks(taskids, _completed, timeout=240)

    # Then every task is COMPLETED with the honest link, the rogue's replicate never got
    # further than what it really did (nothing), it contributed nothing on chain
    assert_completed_with_the_honest_link(pool, taskids)
    rep = pool.store.replicate(first, rogue.address) or {}
    statuses = [e["status"] for e in rep["timeline"]]
    assert not {"CONTRIBUTED", "REVEALED", "RESULT_UPLOADED", "COMPLETED"} & set(statuses)
    assert rep["status"] in ("WORKER_LOST", "ABORTED"), statuses
    client = pool.devnet.client
    assert client.view_contribution(first, rogue.address).status == ContributionStatus.UNSET
    for taskid in taskids:
        assert (pool.store.task(taskid) or {}).get("uploader") in honest
    # its slots are the ones of its valid heartbeat, never the absurd ones
    assert (pool.store.worker(rogue.address) or {})["slots"] == 2
    app = create_app(pool.scheduler.settings, pool.store)
    assert_no_route_answers_500(app.test_client(), pool, taskids)


def test_an_anonymous_reader_sees_no_digest_and_no_log_tail(running_pool: RunningPool) -> None:
    pool = running_pool
    pool.start_worker(3)
    worker = pool.worker_address(3)
    # Given a trust-3 task one node contributed to (the other contributions never come: the
    # task stays in its contribution phase), and a task whose app crashed
    waiting = pool.match(trust=3, workerpoolprice=POOL_PRICE, params=deal_params("secret"))
    crashed = pool.match(app="crash")
    (taskid,) = waiting.taskids()
    (crash_task,) = crashed.taskids()

    def contributed(_: dict[str, Any]) -> bool:
        rep = pool.store.replicate(taskid, worker) or {}
        return rep.get("status") == "CONTRIBUTED"

    def failed(_: dict[str, Any]) -> bool:  # (it goes on to contribute its error result)
        return any(
            e["status"] == "COMPUTE_FAILED"
            for r in pool.store.replicates_of(crash_task)
            for e in r["timeline"]
        )

    pool.wait_tasks([taskid], contributed, timeout=90)
    pool.wait_tasks([crash_task], failed, timeout=90)
    assert (pool.store.task(taskid) or {})["status"] == "RUNNING"
    # the digest the node contributed (the chain holds only keccak(taskid, digest)) is in the
    # node's work directory, and nowhere the scheduler keeps things
    state = json.loads((pool.tmp / "worker-3" / worker / taskid / "state.json").read_text())
    digest = state["digest"]
    assert digest not in json.dumps(pool.store.replicates_of(taskid), default=str)
    (crash_rep,) = pool.store.replicates_of(crash_task)
    output = "boom: something went wrong"  # what the crashing app wrote
    assert output in crash_rep["logTail"]  # kept for the operator

    # When anyone reads the tasks, the worker and the metrics
    app = create_app(pool.scheduler.settings, pool.store)
    api = app.test_client()
    answers = [
        api.get(f"/api/v1/tasks/{taskid}"),
        api.get(f"/api/v1/tasks/{crash_task}"),
        api.get(f"/api/v1/workers/{worker}"),
        api.get("/api/v1/tasks"),
    ]
    # Then no answer holds the digest, nor a log tail
    for response in answers:
        assert response.status_code == 200
        text = response.text
        assert digest.removeprefix("0x") not in text.lower()
        assert "logTail" not in text and "resultDigest" not in text and output not in text
    assert digest.removeprefix("0x") not in api.get("/metrics").text
    # And the operator, with the bearer token, reads the failed run's output
    token_app = create_app(replace(pool.scheduler.settings, api_token=TOKEN), pool.store)
    mine = token_app.test_client().get(
        f"/api/v1/tasks/{crash_task}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    (rep,) = mine.get_json()["replicates"]
    assert rep["logTail"] == crash_rep["logTail"]
    anonymous = token_app.test_client().get(f"/api/v1/tasks/{crash_task}")
    assert "logTail" not in anonymous.get_json()["replicates"][0]


# ---- Redis with a password and TLS -------------------------------------------------------------
@contextmanager
def tls_redis(tmp: Path, password: str) -> Iterator[tuple[str, Path]]:
    """A redis-server that speaks TLS only (a certificate of a CA made here) and wants a
    password; yields its rediss:// URL and the CA certificate."""
    if not shutil.which("redis-server"):
        require_service("redis-server", "not installed")
    make_certs(tmp)
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "redis.crt",
            "--tls-key-file",
            "redis.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        cwd=tmp,
        stdout=(tmp / "redis.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(
                    url, password=password, ssl_ca_certs=str(tmp / "ca.crt")
                ).ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, (tmp / "redis.log").read_text()
                time.sleep(0.1)
        yield url, tmp / "ca.crt"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_redis_with_a_password_and_tls_carries_a_whole_deal(
    devnet: DevnetHandle,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    password = "a long password / with @ and :"
    (tmp_path / "redis-password").write_text(password + "\n")
    with tls_redis(tmp_path, password) as (url, ca):
        # Given a Redis that answers nobody without TLS and the password
        with pytest.raises(redis.RedisError):
            redis.Redis.from_url(url, ssl_ca_certs=str(ca), socket_timeout=3).ping()
        with pytest.raises(redis.RedisError):  # a client that does not know the private CA
            redis.Redis.from_url(url, password=password, socket_timeout=3).ping()
        plain = url.replace("rediss://", "redis://")
        with pytest.raises(redis.RedisError):
            redis.Redis.from_url(plain, password=password, socket_timeout=3).ping()
        env: dict[str, Any] = {  # (Any: mypy would match str values to pool_running's store)
            "WORKERPOOL_REDIS_PASSWORD_FILE": str(tmp_path / "redis-password"),
            "WORKERPOOL_REDIS_CA_FILE": str(ca),
        }
        # When a pool (scheduler, a worker node, the API) uses it for a trust-2 deal
        with pool_running(devnet, url, ipfs_api_url, tmp_path, db="tls", **env) as pool:
            for n in (8, 9):
                pool.start_worker(n)
            deal = pool.match(volume=2, trust=2, workerpoolprice=POOL_PRICE)
            pool.wait_tasks(deal.taskids(), _completed, timeout=180)
            # Then the deal completes, the API reads the queues through the same Redis
            settings = replace(pool.scheduler.settings)
            api = create_app(settings, pool.store).test_client()
            summary = api.get("/api/v1/pool").get_json()
            assert summary["queuesError"] is None and summary["workers"]["alive"] == 2
            assert redis_client(settings).ping()
        for taskid in deal.taskids():
            assert pool.chain_status(taskid) == ChainTaskStatus.COMPLETED
