"""Several worker nodes: consensus with trust > 1, a liar rejected, a lost worker re-planned,
a node added mid-deal, identities leased from one mnemonic, capability routing. Devnet, real
redis-server and dockerd, worker nodes as real processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import docker
import pytest
from click.testing import CliRunner
from devnet_fixtures import DevnetHandle
from pool_fixtures import RunningPool, pool_running

from cli.main import main
from devnet.network import FIRST_WORKER_INDEX, PUBLIC_TEST_MNEMONIC
from devnet.requester import deal_params
from poco.orders import WorkerpoolOrder
from poco.proofs import result_hash
from poco.tags import encode_tag
from poco.types import ChainTaskStatus, ContributionStatus
from pool.settings import Settings
from pool.store import connect
from workers.identity import LeaseLost, derive, lease_index

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

POOL_PRICE = 10_000_000


def _completed(doc: dict[str, Any]) -> bool:
    return doc.get("status") == "COMPLETED"


def test_trust3_deal_completes_with_agreeing_contributions_from_distinct_workers(
    running_pool: RunningPool,
) -> None:
    pool = running_pool
    for n in range(3):
        pool.start_worker(n)
    started = time.monotonic()
    deal = pool.match(volume=2, trust=3, workerpoolprice=POOL_PRICE)
    pool.wait_tasks(deal.taskids(), _completed, timeout=120)
    elapsed = time.monotonic() - started
    client = pool.devnet.client
    for taskid in deal.taskids():
        chain = client.view_task(taskid)
        assert chain.status == ChainTaskStatus.COMPLETED
        assert chain.winner_counter >= 2 and chain.reveal_counter == chain.winner_counter
        contributors = [c.lower() for c in chain.contributors]
        assert len(contributors) == len(set(contributors)) >= 2  # distinct workers
        for worker in contributors:
            assert client.view_contribution(taskid, worker).status == ContributionStatus.PROVED
        reps = pool.store.replicates_of(taskid)
        assert len({r["worker"] for r in reps}) == len(reps)  # never two of one task per worker
        assert sum(r["status"] == "COMPLETED" for r in reps) >= 2
    print(f"trust-3 deal of volume 2: {elapsed:.1f}s from matchOrders to COMPLETED")


def test_a_lying_worker_is_rejected_and_the_task_completes_with_the_honest_result(
    running_pool: RunningPool,
) -> None:
    pool = running_pool
    client = pool.devnet.client
    liar = pool.worker_address(4)
    # Given a liar that takes the first replicate of a trust-3 task
    pool.start_worker(4, WORKERPOOL_FAULT_INJECT="wrong-digest")
    stake_before = client.view_account(liar).stake
    deal = pool.match(trust=3, workerpoolprice=POOL_PRICE)
    (taskid,) = deal.taskids()

    def liar_contributed(_: dict[str, Any]) -> bool:
        rep = pool.store.replicate(taskid, liar)
        return rep is not None and rep["status"] == "CONTRIBUTED"

    pool.wait_tasks([taskid], liar_contributed, timeout=60)
    # When honest workers join
    for n in (5, 6, 7):
        pool.start_worker(n)
    pool.wait_tasks([taskid], _completed, timeout=120)
    # Then the task completes with the honest result, and the liar is rejected on chain:
    # its contribution is not proved, its stake is seized, and its record shows it
    # (the digest revealed on chain is the one the honest workers contributed)
    chain = client.view_task(taskid)
    honest = [w for w in chain.contributors if w.lower() != liar]
    assert honest and chain.result_digest != "0x" + "00" * 32
    for worker in honest:
        contribution = client.view_contribution(taskid, worker)
        assert contribution.result_hash == result_hash(taskid, chain.result_digest)
        assert contribution.status == ContributionStatus.PROVED
    lie = client.view_contribution(taskid, liar)
    assert lie.result_hash != result_hash(taskid, chain.result_digest)
    assert lie.status != ContributionStatus.PROVED
    assert client.view_account(liar).stake == stake_before - POOL_PRICE * 30 // 100
    rep = pool.store.replicate(taskid, liar)
    assert rep is not None and rep["contribution"] == "REJECTED" and rep["status"] == "ABORTED"
    record = pool.store.workers.find_one({"address": liar})
    assert record is not None and record["rejected"] == 1
    replicates = len(pool.store.replicates_of(taskid))
    assert replicates >= 3
    print(f"liar case: {replicates} replicates, {len(chain.contributors)} contributions")


def test_a_killed_worker_is_replanned_and_its_orphan_container_removed(
    running_pool: RunningPool,
) -> None:
    pool = running_pool
    engine = docker.from_env()
    victim = pool.start_worker(8)
    deal = pool.match(app="sleep", params=deal_params("4"))
    (taskid,) = deal.taskids()

    def computing(_: dict[str, Any]) -> bool:
        rep = pool.store.replicate(taskid, pool.worker_address(8))
        return rep is not None and rep["status"] == "COMPUTING"

    pool.wait_tasks([taskid], computing, timeout=60)
    label = {"label": f"workerpool.worker={pool.worker_address(8)}"}
    deadline = time.monotonic() + 10
    while not engine.containers.list(filters=label) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.containers.list(filters=label), "the app container should be running"
    # When the node is killed with -9 while its container runs
    pool.kill_worker(victim)
    pool.start_worker(9)
    # Then its replicate is WORKER_LOST, re-planned, and the task completes before its
    # deadline; the lost replicate, no longer needed, is then recorded ABORTED
    pool.wait_tasks([taskid], _completed, timeout=120)
    lost = pool.store.replicate(taskid, pool.worker_address(8))
    assert lost is not None and lost["status"] == "ABORTED"
    assert [e["status"] for e in lost["timeline"]][-2:] == ["WORKER_LOST", "ABORTED"]
    assert pool.store.replicate(taskid, pool.worker_address(9))["status"] == "COMPLETED"  # type: ignore[index]
    assert pool.store.workers.find_one({"address": pool.worker_address(8)})["status"] == "LOST"  # type: ignore[index]
    # And the orphan container is removed by a live node on this Docker host
    deadline = time.monotonic() + 30
    while engine.containers.list(all=True, filters=label) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert engine.containers.list(all=True, filters=label) == []


def test_a_worker_added_in_the_middle_of_a_deal_takes_part_of_the_work(
    running_pool: RunningPool,
) -> None:
    pool = running_pool
    for n in (10, 11, 12):
        pool.start_worker(n, WORKERPOOL_WORKER_SLOTS="1")
    # enough queued work (12 tasks of 4 s on 3 slots) that the newcomer still finds jobs
    # waiting once it has started, even on a busy machine
    deal = pool.match(app="sleep", volume=12, params=deal_params("4"))
    ids = deal.taskids()

    def some_done(_: dict[str, Any]) -> bool:
        return sum(_completed(pool.store.task(t) or {}) for t in ids) >= 2

    pool.wait_tasks(ids[:1], some_done, timeout=120)
    pool.start_worker(13, WORKERPOOL_WORKER_SLOTS="1")
    pool.wait_tasks(ids, _completed, timeout=180)
    newcomer = pool.worker_address(13)
    taken = [t for t in ids if pool.store.replicate(t, newcomer) is not None]
    assert taken, "the fourth worker took no task"
    assert all(pool.chain_status(t) == ChainTaskStatus.COMPLETED for t in ids)


def test_two_nodes_from_one_mnemonic_get_distinct_indexes(running_pool: RunningPool) -> None:
    pool = running_pool
    pool.start_worker(20, mnemonic=True)
    pool.start_worker(21, mnemonic=True)
    a = pool.store.workers.find_one({"name": "test-worker-20"})
    b = pool.store.workers.find_one({"name": "test-worker-21"})
    assert a is not None and b is not None and a["address"] != b["address"]
    expected = {
        pool.devnet.client.w3.eth.account.from_key(
            derive(PUBLIC_TEST_MNEMONIC, FIRST_WORKER_INDEX + i)
        ).address.lower()
        for i in range(16)
    }
    assert {a["address"], b["address"]} <= expected


def test_index_leases_are_exclusive_renewable_and_expire(redis_client: Any) -> None:
    first = lease_index(redis_client, 4, 3, ttl_ms=500)
    second = lease_index(redis_client, 4, 3, ttl_ms=500)
    assert (first.index, second.index) == (4, 5)
    first.renew()
    # an impostor holding our index makes renewal fail: the node must stop
    redis_client.set(first.key, "someone-else")
    with pytest.raises(LeaseLost):
        first.renew()
    # a dead node's lease expires and a restarted node can take its index
    time.sleep(0.7)
    third = lease_index(redis_client, 4, 3, ttl_ms=500)
    assert third.index in (4, 5)


def test_a_gpu_deal_waits_visibly_until_a_gpu_worker_joins(running_pool: RunningPool) -> None:
    pool = running_pool
    pool.start_worker(14)  # standard only
    deal = pool.match(tag=encode_tag("gpu"))
    (taskid,) = deal.taskids()
    (doc,) = pool.wait_tasks(
        [taskid], lambda d: d.get("waitingReason", "").startswith("waiting"), timeout=30
    )
    assert doc["queue"] == "replicates.gpu"
    assert doc["waitingReason"] == "waiting: no live worker serves replicates.gpu"
    assert pool.store.replicates_of(taskid) == []
    pool.start_worker(15, WORKERPOOL_WORKER_CAPABILITIES="standard,gpu")
    (doc,) = pool.wait_tasks([taskid], _completed, timeout=90)
    assert pool.store.replicate(taskid, pool.worker_address(15)) is not None
    assert doc.get("waitingReason", "") == ""


def test_a_gpu_order_signed_while_a_gpu_node_is_alive_sells_deals_only_that_node_runs(
    devnet: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    settings = Settings(mongo_url="mongomock://gpu-order-e2e", mongo_db="e2e")
    store = connect(settings)  # the scheduler's store, which `order sign` reads in-process
    with pool_running(devnet, redis_url, ipfs_api_url, tmp_path, store=store) as pool:
        pool.start_worker(10)  # standard only
        pool.start_worker(11, WORKERPOOL_WORKER_CAPABILITIES="standard,gpu")
        template, signed = tmp_path / "gpu.json", tmp_path / "gpu.signed.json"
        env = {
            **{k: v for k, v in pool.env.items() if k.startswith(("IEXEC_", "WORKERPOOL_"))},
            "POOL_ADDRESS": devnet.info["workerpool"],
            "IEXEC_CORE_WALLET_PRIVATE_KEY": devnet.key("scheduler"),
            "MONGO_URL": str(settings.mongo_url),
            "MONGO_DB": settings.mongo_db,
            "WORKERPOOL_ORDER_TAG": "gpu",
            "WORKERPOOL_ORDER_VOLUME": "3",
            "WORKERPOOL_ORDER_TRUST": "1",
        }
        runner = CliRunner()
        for args in (
            ["order", "init", "--out", str(template)],
            ["order", "sign", str(template), "--out", str(signed)],
        ):
            result = runner.invoke(main, args, env=env)
            assert result.exit_code == 0, result.output
        order = WorkerpoolOrder.from_dict(json.loads(signed.read_text()))
        assert order.tag == encode_tag("gpu")

        deal = pool.match(volume=3, tag=order.tag, workerpoolorder=order)
        pool.wait_tasks(deal.taskids(), _completed, timeout=180)
        gpu_node, standard_node = pool.worker_address(11), pool.worker_address(10)
        for taskid in deal.taskids():
            assert pool.chain_status(taskid) == ChainTaskStatus.COMPLETED
            assert (pool.store.task(taskid) or {})["queue"] == "replicates.gpu"
            assert {r["worker"] for r in pool.store.replicates_of(taskid)} == {gpu_node}
        assert pool.store.replicates_of_worker(standard_node) == []
