"""How every process reaches Redis (``pool/broker.py``): one server or Redis Sentinel, the
settings that say so and their refusals, the Celery app built on them, and what a real link
exposed in kombu and in the worker node (a connection torn down under its channel, an
authorization answer lost, the chain out of reach after the authorization). The broker
failover and cut links themselves run in ``tests/test_hosts.py``."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest

from poco.errors import RetryableError, TransportError
from poco.types import ChainTaskStatus
from pool import broker, keys
from pool.messages import (
    AnswerLost,
    Authorization,
    AuthorizeRequest,
    MessageSigner,
    Messenger,
    heartbeat_time,
    make_celery,
)
from pool.settings import Settings, SettingsError
from pool.states import ReplicateStatus
from testing.celery import FAKE_DOMAIN, FakeCelery, fake_messenger
from testing.chain import FakeChain, chain_task
from testing.runner import FakeRunner
from workers.node import WorkerNode

KEY = "0x" + "5b" * 32

SENTINELS = "sentinel://:pw@10.0.0.1:26379/2;sentinel://:pw@10.0.0.2:26380/2;sentinel://10.0.0.3/2"


# ---- the settings ------------------------------------------------------------------------------
def test_a_redis_url_is_one_server() -> None:
    where = broker.target(Settings(redis_url="redis://:secret@10.0.0.1:6379/3"))
    assert not where.sentinel and where.url == "redis://:secret@10.0.0.1:6379/3"


def test_a_sentinel_url_names_every_sentinel_the_password_and_the_database() -> None:
    settings = Settings(
        redis_url=SENTINELS, redis_master_name="workerpool", redis_sentinel_password="spw"
    )
    where = broker.target(settings)
    assert where.sentinel
    assert where.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert (where.password, where.db, where.master_name) == ("pw", 2, "workerpool")
    assert where.sentinel_password == "spw"


@pytest.mark.parametrize(
    ("url", "master", "says"),
    [
        (SENTINELS, "", "WORKERPOOL_REDIS_MASTER_NAME is required"),
        ("sentinel://10.0.0.1:26379/0;redis://10.0.0.2:6379/0", "m", "not a mix"),
        ("redis://10.0.0.1:6379/0;redis://10.0.0.2:6379/0", "", "not a mix"),
        ("sentinel://10.0.0.1:26379/zero", "m", "database 'zero' is not a number"),
        ("sentinel://10.0.0.1:port/0", "m", "WORKERPOOL_REDIS_URL"),
        ("sentinel:///0", "m", "has no host"),
    ],
)
def test_a_wrong_sentinel_setting_is_refused_with_what_to_fix(
    url: str, master: str, says: str
) -> None:
    with pytest.raises(SettingsError, match=says):
        broker.target(Settings(redis_url=url, redis_master_name=master))
    with pytest.raises(SettingsError, match=says):  # and no process starts with it
        make_celery(Settings(redis_url=url, redis_master_name=master))


def test_the_settings_are_read_from_the_environment_and_the_password_is_secret() -> None:
    settings = Settings.from_env(
        {
            "WORKERPOOL_REDIS_URL": SENTINELS,
            "WORKERPOOL_REDIS_MASTER_NAME": "workerpool",
            "WORKERPOOL_REDIS_SENTINEL_PASSWORD": "spw",
        }
    )
    assert settings.redis_master_name == "workerpool"
    assert settings.public()["redis_sentinel_password"] == "***"


# ---- the Celery app and the Redis clients --------------------------------------------------
def test_the_celery_app_reaches_the_primary_through_the_sentinels() -> None:
    settings = Settings(
        redis_url=SENTINELS, redis_master_name="workerpool", redis_sentinel_password="spw"
    )
    app = make_celery(settings)
    connection = app.connection_for_write()
    assert isinstance(connection.transport, broker.SentinelTransport)
    assert len(connection.alt) == 3  # every Sentinel, tried in turn
    options = app.conf.broker_transport_options
    assert options["master_name"] == "workerpool"
    assert options["sentinel_kwargs"] == {"password": "spw"}
    assert options["visibility_timeout"] == 12 * 3600
    assert options["socket_timeout"] and options["socket_keepalive"]
    assert app.conf.result_backend_transport_options["master_name"] == "workerpool"
    assert app.conf.broker_connection_max_retries is None  # a far node never gives up
    assert app.conf.task_publish_retry_policy["max_retries"] >= 20


def test_a_plain_redis_app_keeps_timeouts_and_keepalive_too() -> None:
    app = make_celery(Settings(redis_url="redis://127.0.0.1:6379/0"))
    assert isinstance(app.connection_for_write().transport, broker.RedisTransport)
    assert "master_name" not in app.conf.broker_transport_options
    assert app.conf.broker_transport_options["health_check_interval"] > 0


def test_the_redis_client_asks_the_sentinels_for_the_primary() -> None:
    client = broker.redis_client(
        Settings(redis_url=SENTINELS, redis_master_name="workerpool", redis_sentinel_password="x")
    )
    pool = client.connection_pool
    assert pool.service_name == "workerpool"
    assert [
        (s.connection_pool.connection_kwargs["host"]) for s in pool.sentinel_manager.sentinels
    ] == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]
    assert pool.connection_kwargs["password"] == "pw" and pool.connection_kwargs["db"] == 2


# ---- kombu: a connection torn down under its channel ------------------------------------------
@pytest.mark.redis
@pytest.mark.parametrize("safe", [False, True])
def test_an_unacked_message_of_a_torn_down_connection_is_left_to_redis_not_a_crash(
    redis_url: str, redis_client: Any, safe: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a channel holding a message it took and did not acknowledge
    app = make_celery(Settings(redis_url=redis_url))
    app.conf.broker_transport = None if not safe else app.conf.broker_transport
    with app.connection_for_write() as connection:
        channel = connection.channel()
        assert isinstance(channel.qos, broker.SafeQoS) is safe
        channel.queue_declare("wp-broker-test")
        channel.basic_publish(channel.prepare_message("job"), "", "wp-broker-test")
        assert channel.basic_get("wp-broker-test", no_ack=False) is not None
        # When its connection is torn down first (what Celery's consumer does after a lost
        # broker connection: collect, then close) and the channel closes after it
        connection.transport.client = None
        if not safe:
            # Then kombu's own QoS lets an AttributeError out (it stopped Celery workers for
            # good on a Sentinel failover). If this fails, kombu fixed it: SafeQoS may go.
            with pytest.raises(AttributeError):
                channel.close()
            return
        with caplog.at_level(logging.WARNING, logger="pool.broker"):
            channel.close()
    # ours logs it, and the message stays unacknowledged in Redis for the visibility timeout
    assert "left to the visibility timeout" in caplog.text
    assert redis_client.hlen("unacked") == 1


# ---- Messenger: a pooled producer left with a closed channel -------------------------------
class _StaleProducer:
    def __init__(self) -> None:
        self.__connection__ = SimpleNamespace(collected=False)
        self.__connection__.collect = lambda: setattr(self.__connection__, "collected", True)


class _PoolingCelery(FakeCelery):
    """A Celery whose pooled producer is broken once (kombu after a cut link)."""

    def __init__(self) -> None:
        super().__init__()
        self.producer = _StaleProducer()
        self.fresh: list[Any] = []

    @contextlib.contextmanager
    def producer_or_acquire(self) -> Iterator[Any]:
        yield self.producer

    @contextlib.contextmanager
    def connection_for_write(self) -> Iterator[Any]:
        connection = object()
        self.fresh.append(connection)
        yield connection

    def send_task(
        self, name: str, args: Any = None, kwargs: Any = None, queue: str = "", **options: Any
    ) -> None:
        if options.get("producer") is self.producer:
            raise AttributeError("'NoneType' object has no attribute 'client'")
        assert options.get("connection") in self.fresh
        super().send_task(name, args, kwargs, queue=queue)


def test_a_message_sent_on_a_broken_pooled_connection_goes_out_on_a_fresh_one() -> None:
    celery = _PoolingCelery()
    Messenger(celery).reveal("0x" + "ab" * 20, "0x" + "01" * 32)
    assert [m.name for m in celery.messages] == ["workers.reveal"]
    assert celery.producer.__connection__.collected  # the broken one is reopened next time


# ---- the worker node: an answer lost, the chain out of reach -----------------------------------
TASK = "0x" + "07" * 32
ADDRESS = "0x00000000000000000000000000000000000000aa"


class _Messages(Messenger):
    def __init__(self, answer: Authorization | Exception) -> None:
        super().__init__(FakeCelery())
        self.answer = answer
        self.reports: list[Any] = []

    def authorize(self, request: AuthorizeRequest, timeout: float) -> Authorization:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def report(self, report: Any) -> None:
        self.reports.append(report)


class _ChainOutOfReach(FakeChain):
    """A chain that answers the node's first look at the deal (before the authorization),
    then no more."""

    def view_deal(self, dealid: str, *, fresh: bool = False) -> Any:
        self.calls["viewDeal"] += 1
        if self.calls["viewDeal"] == 1:
            return super().view_deal(dealid, fresh=fresh)
        raise TransportError("viewDeal: chain node unreachable after 6 attempts")


class _FundedNode(WorkerNode):
    def cannot_take(self, deal: Any) -> str:
        return ""  # gas and stake are not what these tests are about


def _node(tmp_path: Path, chain: FakeChain, messages: Messenger) -> WorkerNode:
    dealid = chain.add_deal(0, 1)
    chain.tasks[TASK] = chain_task(
        TASK,
        ChainTaskStatus.ACTIVE,
        dealid=dealid,
        contribution_deadline=chain.now + 3600,
        timeref=300,
    )
    return _FundedNode(
        Settings(redis_url="redis://127.0.0.1:1/0", worker_name="t"),
        chain,  # type: ignore[arg-type]
        SimpleNamespace(address=ADDRESS),  # type: ignore[arg-type]
        messages,
        FakeRunner(),
        None,  # type: ignore[arg-type]
        workdir=tmp_path,
    )


def test_a_lost_authorization_answer_gives_the_replicate_up_and_puts_the_job_back(
    tmp_path: Path,
) -> None:
    messages = _Messages(AnswerLost("ConnectionError: Error 113 connecting: No route to host"))
    node = _node(tmp_path, FakeChain(), messages)
    with pytest.raises(RetryableError, match="authorization answer lost"):  # job requeued
        node.run_replicate(TASK)
    (report,) = messages.reports
    assert report.status == ReplicateStatus.ABORTED and "No route to host" in report.reason
    assert node.busy == 0


def test_the_chain_out_of_reach_after_the_authorization_aborts_the_replicate(
    tmp_path: Path,
) -> None:
    messages = _Messages(Authorization(granted=True, signature="0x" + "11" * 65))
    node = _node(tmp_path, _ChainOutOfReach(), messages)
    outcome = node.run_replicate(TASK)  # no exception: the job is done with, not retried
    assert outcome.status == str(ReplicateStatus.ABORTED)
    # (STARTING goes with the ABORTED that follows it at once)
    assert [(r.passed, r.status) for r in messages.reports] == [
        ((ReplicateStatus.STARTING,), ReplicateStatus.ABORTED)
    ]
    assert "chain node unreachable" in messages.reports[-1].reason


# ---- liveness ----------------------------------------------------------------------------------
def test_a_node_liveness_lasts_worker_lost_timeout_and_holds_its_signed_heartbeat(
    tmp_path: Path,
) -> None:
    # Given a node whose heartbeat period is far below WORKER_LOST_TIMEOUT
    redis = fakeredis.FakeRedis()
    messages, _ = fake_messenger(KEY)
    address = MessageSigner(KEY, FAKE_DOMAIN).address.lower()
    node = WorkerNode(
        Settings(redis_url="redis://127.0.0.1:1/0", worker_name="t", worker_lost_timeout=45),
        None,  # type: ignore[arg-type]  # no chain needed for liveness
        SimpleNamespace(address=address),  # type: ignore[arg-type]
        messages,
        FakeRunner(),
        None,  # type: ignore[arg-type]
        redis=redis,
        workdir=tmp_path,
    )
    stop = threading.Event()
    beating = threading.Thread(target=node.heartbeat_forever, args=(0.05, stop), daemon=True)
    beating.start()
    deadline = time.monotonic() + 5
    while redis.get(keys.node_seen(address)) is None and time.monotonic() < deadline:
        stop.wait(0.01)
    stop.set()
    beating.join(5)
    # Then the liveness Redis holds is the node's signed heartbeat, fresh
    seen = heartbeat_time(redis.get(keys.node_seen(address)), address, FAKE_DOMAIN)
    assert seen is not None and abs(time.time() - seen) < 5
    # and its alive key lasts WORKER_LOST_TIMEOUT, not three heartbeats: peers on its Docker
    # host never remove the containers of a node the pool still counts on
    assert 40_000 < redis.pttl(keys.node_alive(address)) <= 45_000
