"""End to end on the devnet with real redis-server, dockerd and IPFS: a deal matched on chain
ends COMPLETED with its result published, computed by ``workerpool worker`` processes."""

from __future__ import annotations

import http.server
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from devnet_fixtures import DevnetHandle
from pool_fixtures import RunningPool

from devnet.requester import deal_params
from poco.results import parse_result_link
from poco.types import ChainTaskStatus

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

APP_PRICE = 1_000_000
POOL_PRICE = 10_000_000


def _completed(doc: dict[str, Any]) -> bool:
    return doc.get("status") == "COMPLETED"


def _fetch_ipfs(ipfs_api_url: str, location: str) -> bytes:
    cid = location.removeprefix("/ipfs/")
    r = requests.post(
        f"{ipfs_api_url}/api/v0/cat", params={"arg": cid, "timeout": "5s"}, timeout=10
    )
    r.raise_for_status()
    return r.content


def _stakes(devnet: DevnetHandle, *who: str) -> list[int]:
    return [devnet.client.view_account(a).stake for a in who]


def test_trust1_deal_of_volume3_completes_with_published_results_and_rewards(
    running_pool: RunningPool, ipfs_api_url: str
) -> None:
    pool = running_pool
    devnet = pool.devnet
    worker = devnet.accounts["workers"][0]["address"]
    scheduler = devnet.address("scheduler")
    # Given one worker node and a trust-1 deal of volume 3
    pool.start_worker(0)
    before = _stakes(devnet, devnet.address("requester"), devnet.address("app_provider"), worker)
    sched_before = devnet.client.view_account(scheduler)
    deal = pool.match(
        volume=3,
        trust=1,
        appprice=APP_PRICE,
        workerpoolprice=POOL_PRICE,
        params=deal_params("hello world"),
    )
    # When the pool runs, Then every task ends COMPLETED in Mongo and on chain
    docs = pool.wait_tasks(deal.taskids(), _completed, timeout=120)
    for taskid, doc in zip(deal.taskids(), docs, strict=True):
        chain = devnet.client.view_task(taskid)
        assert chain.status == ChainTaskStatus.COMPLETED
        # results is the iExec link, and it resolves to a zip with the app's output
        link = chain.results.decode()
        assert link.startswith('{ "storage": "ipfs", "location": "/ipfs/')
        storage, location = parse_result_link(link)
        assert storage == "ipfs" and doc["resultLink"] == link
        archive = zipfile.ZipFile(io.BytesIO(_fetch_ipfs(ipfs_api_url, location)))
        assert "computed.json" in archive.namelist()
        text = archive.read("result.txt").decode()
        assert "args: hello world" in text and f"IEXEC_TASK_ID={taskid}" in text
        # trust 1: the worker's contributeAndFinalize did contribute, reveal and finalize
        timeline = [e["status"] for e in doc["timeline"]]
        assert timeline[-3:] == ["RUNNING", "FINALIZED", "COMPLETED"]
        assert doc["timeline"][-2]["note"] == f"contributeAndFinalize by {worker.lower()}"
        assert chain.contributors == (worker,) and chain.reveal_counter == 1
        reps = pool.store.replicates_of(taskid)
        assert [r["status"] for r in reps] == ["COMPLETED"] and reps[0]["worker"] == worker.lower()
    # And the escrow moved as docs/protocol.md says: worker 99 % of the price, app owner its price
    after = _stakes(devnet, devnet.address("requester"), devnet.address("app_provider"), worker)
    assert [a - b for a, b in zip(after, before, strict=True)] == [
        -3 * (APP_PRICE + POOL_PRICE),
        3 * APP_PRICE,
        3 * POOL_PRICE * 99 // 100,
    ]
    sched_after = devnet.client.view_account(scheduler)
    # the scheduler gets 1 % per task (plus a kitty share when an earlier task was claimed)
    assert sched_after.stake - sched_before.stake >= 3 * POOL_PRICE // 100
    assert sched_after.locked == sched_before.locked


@pytest.fixture
def file_server() -> Iterator[str]:
    files = {"/numbers.txt": b"1 2 3\n", "/words.txt": b"alpha beta\n"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_app_sees_input_files_and_args(
    running_pool: RunningPool, ipfs_api_url: str, file_server: str
) -> None:
    pool = running_pool
    pool.start_worker(1)
    urls = [f"{file_server}/numbers.txt", f"{file_server}/words.txt"]
    deal = pool.match(params=deal_params("one 'two three'", urls))
    (doc,) = pool.wait_tasks(deal.taskids(), _completed, timeout=90)
    _, location = parse_result_link(doc["resultLink"])
    text = zipfile.ZipFile(io.BytesIO(_fetch_ipfs(ipfs_api_url, location))).read("result.txt")
    out = text.decode()
    assert "args: one two three" in out
    assert "IEXEC_INPUT_FILES_NUMBER=2" in out
    assert "1 2 3" in out and "alpha beta" in out


def test_a_crashing_app_completes_with_an_error_result_and_nothing_is_claimed(
    running_pool: RunningPool, ipfs_api_url: str
) -> None:
    pool = running_pool
    devnet = pool.devnet
    pool.start_worker(2)
    requester, scheduler = devnet.address("requester"), devnet.address("scheduler")
    before = devnet.client.view_account(requester)
    pool_before = devnet.client.view_account(scheduler)
    deal = pool.match(app="crash", appprice=APP_PRICE, workerpoolprice=POOL_PRICE)
    (taskid,) = deal.taskids()
    # Then the task completes at once with iexec-worker's error result (not claimed at its
    # final deadline): the app ran, the requester pays for it, the pool owner loses nothing
    pool.wait_tasks([taskid], _completed, timeout=90)
    chain = devnet.client.view_task(taskid)
    assert chain.status == ChainTaskStatus.COMPLETED
    _, location = parse_result_link(chain.results.decode())
    archive = zipfile.ZipFile(io.BytesIO(_fetch_ipfs(ipfs_api_url, location)))
    assert archive.read("error.txt") == (
        b"[IEXEC] Errors occurred while computing the task [error:COMPUTE_FAILED, "
        b"causes:[WorkflowError[cause=APP_COMPUTE_FAILED, message=]]]"
    )
    # And the replicate says why: the status, its cause, the app's exit code and log tail
    (rep,) = pool.store.replicates_of(taskid)
    (failed,) = [e for e in rep["timeline"] if e["status"] == "COMPUTE_FAILED"]
    assert failed["cause"] == "APP_COMPUTE_FAILED"
    assert "exited with code 3" in rep["reason"] and rep["exitCode"] == 3
    assert "boom: something went wrong" in rep["logTail"]
    assert rep["status"] == "COMPLETED" and pool.store.task(taskid)["replicatesNeeded"] == 1  # type: ignore[index]
    after = devnet.client.view_account(requester)
    assert before.stake - after.stake == APP_PRICE + POOL_PRICE
    pool_after = devnet.client.view_account(scheduler)
    assert pool_after.stake >= pool_before.stake and pool_after.locked == pool_before.locked


def test_output_flood_and_timeout_are_stopped_and_the_worker_keeps_serving(
    running_pool: RunningPool,
) -> None:
    pool = running_pool
    pool.start_worker(3, WORKERPOOL_APP_MAX_RUNTIME="3")
    flood = pool.match(app="bigout", params=deal_params("50"))  # 50 MB > the 5 MB limit
    sleeper = pool.match(app="sleep", params=deal_params("3600"))
    ids = [*flood.taskids(), *sleeper.taskids()]
    # Then both end with an error result (the app left nothing usable), promptly
    pool.wait_tasks(ids, _completed, timeout=90)
    (big,) = pool.store.replicates_of(flood.taskids()[0])
    (slow,) = pool.store.replicates_of(sleeper.taskids()[0])
    assert "output exceeded the limit" in big["reason"]
    assert "time limit" in slow["reason"]
    causes = {e["status"]: e.get("cause") for e in slow["timeline"]}
    assert causes["COMPUTE_FAILED"] == "APP_COMPUTE_TIMEOUT"
    # And the same worker still computes the next deal
    ok = pool.match(params=deal_params("still alive"))
    pool.wait_tasks(ok.taskids(), _completed, timeout=90)
    names = json.dumps([r["worker"] for r in pool.store.replicates_of(ok.taskids()[0])])
    assert pool.devnet.accounts["workers"][3]["address"].lower() in names


def test_nodes_without_gas_or_stake_give_the_job_back_and_a_funded_node_computes_it(
    chain_snapshot: DevnetHandle, running_pool: RunningPool
) -> None:
    from poco import actions

    pool = running_pool
    devnet = chain_snapshot
    dry, unstaked, funded = (pool.worker_address(n) for n in (13, 14, 15))
    # Given a node whose wallet cannot pay for gas, and one with no free stake left
    devnet.rpc("anvil_setBalance", [dry, "0x0"])
    poor = devnet.worker_wallet(14)
    actions.withdraw(poor, devnet.client.view_account(poor.address).stake)
    pool.start_worker(13)
    pool.start_worker(14)
    # When a trust-2 deal comes (contribute locks the worker stake: 30 % of the price)
    deal = pool.match(trust=2, workerpoolprice=POOL_PRICE, params=deal_params("funds"))
    (taskid,) = deal.taskids()

    # Then each node gives the job back with its reason, before any authorization
    def refusals() -> dict[str, str]:
        return {
            w["address"]: w.get("refusing", "")
            for w in pool.store.workers.find({"address": {"$in": [dry, unstaked]}})
        }

    pool.wait_tasks([taskid], lambda _: all(refusals().get(w) for w in (dry, unstaked)), timeout=60)
    reasons = refusals()
    assert "gas balance is empty" in reasons[dry] and "please refill" in reasons[dry]
    assert "stake too low" in reasons[unstaked]
    assert f"locks {POOL_PRICE * 30 // 100 / 10**9:g} RLC" in reasons[unstaked]
    assert pool.store.replicates_of(taskid) == []
    logs = "".join(p.read_text() for p in pool.logs)
    assert "job given back for another node: gas balance is empty" in logs
    assert "job given back for another node: stake too low" in logs
    # And a funded node takes it: the task completes with its contribution only
    pool.start_worker(15)
    pool.wait_tasks([taskid], _completed, timeout=120)
    assert [r["worker"] for r in pool.store.replicates_of(taskid)] == [funded]
    assert devnet.client.view_task(taskid).contributors == (
        devnet.accounts["workers"][15]["address"],
    )


def test_a_deal_on_the_native_mode_devnet_completes(
    native_devnet: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    from pool_fixtures import pool_running

    devnet = native_devnet
    worker = devnet.accounts["workers"][0]["address"]
    with pool_running(devnet, redis_url, ipfs_api_url, tmp_path, db="e2e-native") as pool:
        pool.start_worker(0)
        before = _stakes(devnet, devnet.address("requester"), worker)
        deal = pool.match(
            trust=1, appprice=APP_PRICE, workerpoolprice=POOL_PRICE, params=deal_params("native")
        )
        (taskid,) = deal.taskids()
        (doc,) = pool.wait_tasks([taskid], _completed, timeout=120)
        chain = devnet.client.view_task(taskid)
        assert chain.status == ChainTaskStatus.COMPLETED and doc["resultLink"]
        assert chain.results.decode() == doc["resultLink"]
        after = _stakes(devnet, devnet.address("requester"), worker)
        assert [a - b for a, b in zip(after, before, strict=True)] == [
            -(APP_PRICE + POOL_PRICE),
            POOL_PRICE * 99 // 100,
        ]
