"""Failures the way iexec-worker and iexec-core handle them, end to end: the devnet (anvil +
PoCo), real redis-server, dockerd and IPFS, worker nodes as real ``workerpool worker``
processes.

* the app's or the requester's failures (an image that does not exist, an input URL that
  answers 404, a dataset whose checksum differs, an app that fails without a result, a tree
  no path can name) complete on chain with iexec-worker's error result, for trust 1 and 2,
  and the pool owner's stake is unchanged; an app that fails after writing its result has
  it contributed (iexec-worker v9.2);
* a node whose Docker engine dies mid-deal: its tasks complete on another node, and it is
  PAUSED after WORKERPOOL_WORKER_MAX_FAILURES (the shared dockerd is never stopped: that
  node reaches it through a socket proxy of the test, which is stopped);
* a replicate no longer needed (consensus reached without it, contribution deadline
  passed) has its container stopped by its node, on the scheduler's word;
* 100 tasks on one node, failures included, leave its work directory empty;
* input URLs to loopback, to the metadata address, or redirected to loopback are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from api_support import wait_for
from devnet_fixtures import DevnetHandle
from engine_support import EngineProxy, HttpServer, Registry
from pool_fixtures import RunningPool, pool_running

from api.queries import worker_view
from devnet.requester import MatchedDeal, deal_params, match_deal
from poco.results import parse_result_link
from poco.types import ChainTaskStatus
from pool.clock import utcnow
from workers.node import WORKER_LABEL
from workers.results import error_text

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

POOL_PRICE = 10_000_000
TIMEREF = 300  # category 0 (XS)
Doc = dict[str, Any]


def _completed(doc: Doc) -> bool:
    return doc.get("status") == "COMPLETED"


def _fetch_ipfs(ipfs_api_url: str, link: str) -> zipfile.ZipFile:
    _, location = parse_result_link(link)
    answer = requests.post(
        f"{ipfs_api_url}/api/v0/cat",
        params={"arg": location.removeprefix("/ipfs/"), "timeout": "5s"},
        timeout=10,
    )
    answer.raise_for_status()
    return zipfile.ZipFile(io.BytesIO(answer.content))


def _register_app(devnet: DevnetHandle, name: str, image: str) -> str:
    """An app on chain whose image is ``image`` (owned by the devnet's app provider)."""
    registry = devnet.client.contract("AppRegistry", devnet.info["app_registry"])
    owner = devnet.wallet("app_provider")
    args = (owner.address, name, "DOCKER", image.encode(), b"\x00" * 32, b"")
    address = str(registry.functions.predictApp(*args).call())
    if not devnet.client.eth.get_code(address):
        owner.transact(registry.functions.createApp(*args))
    return address


def _register_dataset(devnet: DevnetHandle, name: str, url: str, checksum: bytes) -> str:
    registry = devnet.client.contract("DatasetRegistry", devnet.info["dataset_registry"])
    owner = devnet.wallet("app_provider")
    args = (owner.address, name, url.encode(), checksum)
    address = str(registry.functions.predictDataset(*args).call())
    if not devnet.client.eth.get_code(address):
        owner.transact(registry.functions.createDataset(*args))
    return address


def _match(pool: RunningPool, app: str, **kw: Any) -> MatchedDeal:
    """A deal of the app at address ``app``."""
    devnet = pool.devnet
    return match_deal(
        devnet.client,
        app=app,
        app_owner_key=devnet.key("app_provider"),
        workerpool=devnet.info["workerpool"],
        scheduler_key=devnet.key("scheduler"),
        requester_key=devnet.key("requester"),
        **kw,
    )


def _containers(worker: str) -> list[Any]:
    engine = docker.from_env()
    return list(engine.containers.list(all=True, filters={"label": f"{WORKER_LABEL}={worker}"}))


def _remove_containers(worker: str) -> None:
    for container in _containers(worker):
        container.remove(force=True)


# ---- error results ------------------------------------------------------------------------------
@pytest.fixture
def requester_servers() -> Iterator[tuple[HttpServer, Registry]]:
    files, registry = HttpServer(), Registry("404")
    yield files, registry
    files.close()
    registry.close()


@pytest.mark.parametrize("trust", [1, 2])
def test_failures_of_the_app_or_its_inputs_complete_with_an_error_result(
    trust: int,
    running_pool: RunningPool,
    ipfs_api_url: str,
    requester_servers: tuple[HttpServer, Registry],
) -> None:
    pool = running_pool
    devnet = pool.devnet
    files, registry = requester_servers
    # Given an app whose image the registry does not have, an input URL that answers 404,
    # a dataset whose file is not the one its checksum names
    missing_image = _register_app(devnet, f"missing-{trust}", registry.image(f"missing{trust}/app"))
    files.routes["/dataset.bin"] = (200, {}, b"the dataset as served")
    dataset = _register_dataset(
        devnet,
        f"tampered-{trust}",
        files.url("/dataset.bin"),
        hashlib.sha256(b"the dataset as published").digest(),
    )
    scheduler = devnet.address("scheduler")
    before = devnet.client.view_account(scheduler)
    for n in (1, 2):
        pool.start_worker(n)
    priced: dict[str, Any] = {"trust": trust, "workerpoolprice": POOL_PRICE}
    deals = {
        "image": _match(pool, missing_image, **priced),
        "input": pool.match(params=deal_params("x", [files.url("/missing.csv")]), **priced),
        "dataset": pool.match(
            dataset=dataset, dataset_owner_key=devnet.key("app_provider"), **priced
        ),
        # an app that exits 3 without writing anything, one whose tree no path can name
        "crash": pool.match(app="crash", **priced),
        "deeptree": pool.match(app="deeptree", params=deal_params("40 200"), **priced),
        # an app that exits 1 after writing its result
        "failwrite": pool.match(app="failwrite", params=deal_params("1"), **priced),
    }
    ids = {name: deal.taskids()[0] for name, deal in deals.items()}
    # When the pool runs them, Then every task completes, promptly, on chain
    pool.wait_tasks(list(ids.values()), _completed, timeout=300)
    expected = {
        "image": ("APP_DOWNLOAD_FAILED", "APP_IMAGE_DOWNLOAD_FAILED", "manifest unknown"),
        "input": ("DATA_DOWNLOAD_FAILED", "INPUT_FILES_DOWNLOAD_FAILED", "HTTP 404"),
        "dataset": ("DATA_DOWNLOAD_FAILED", "DATASET_FILE_BAD_CHECKSUM", "checksum mismatch"),
        "crash": ("COMPUTE_FAILED", "APP_COMPUTE_FAILED", "app exited with code 3"),
        "deeptree": (
            "COMPUTE_FAILED",
            "POST_COMPUTE_OUT_FOLDER_ZIP_FAILED",
            "cannot be zipped: File name too long",
        ),
    }
    for name, (status, cause, why) in expected.items():
        taskid = ids[name]
        chain = devnet.client.view_task(taskid)
        assert chain.status == ChainTaskStatus.COMPLETED, name
        # with iexec-worker's error result: error.txt is the deterministic output
        text = error_text(status, [cause])
        assert chain.result_digest == "0x" + hashlib.sha256(text.encode()).hexdigest(), name
        archive = _fetch_ipfs(ipfs_api_url, chain.results.decode())
        assert archive.read("error.txt").decode() == text
        assert sorted(archive.namelist()) == ["computed.json", "error.txt"]
        # and the requester reads why from the API: the failure, its cause, the reason
        (rep,) = pool.store.replicates_of(taskid)
        (failure,) = [e for e in rep["timeline"] if e["status"] == status]
        assert failure["cause"] == cause and why in rep["reason"], (name, rep)
        after = [e["status"] for e in rep["timeline"]]
        assert after[after.index(status) + 1] == "CONTRIBUTING"
    # And the app that failed after writing its result has that result contributed
    failwrite = devnet.client.view_task(ids["failwrite"])
    archive = _fetch_ipfs(ipfs_api_url, failwrite.results.decode())
    assert archive.read("result.txt") == b"failwrite: 1\n"
    (rep,) = pool.store.replicates_of(ids["failwrite"])
    (computed,) = [e for e in rep["timeline"] if e["status"] == "COMPUTED"]
    assert computed["cause"] == "APP_COMPUTE_FAILED" and rep["exitCode"] == 1
    # And the pool owner lost nothing: no task was claimed, its stake is not locked any more
    after_account = devnet.client.view_account(scheduler)
    assert after_account.stake >= before.stake and after_account.locked == before.locked
    assert all((pool.store.task(t) or {})["status"] == "COMPLETED" for t in ids.values())
    # And the registry was asked, the dataset fetched: nothing was skipped
    assert any("/manifests/" in r for r in registry.requests)
    assert "/dataset.bin" in files.requests and "/missing.csv" in files.requests


def test_input_urls_to_loopback_metadata_or_redirected_there_are_refused(
    running_pool: RunningPool, ipfs_api_url: str
) -> None:
    pool = running_pool
    secret, public = HttpServer(), HttpServer()
    try:
        secret.routes["/secret"] = (200, {}, b"what only the node's host may read")
        # a server the pool lets through by name (it stands for a public one) that redirects
        # to the node's loopback
        public.routes["/data.csv"] = (302, {"Location": secret.url("/secret")}, b"")
        pool.start_worker(
            10,
            WORKERPOOL_DOWNLOAD_ALLOW_PRIVATE="false",
            WORKERPOOL_DOWNLOAD_PRIVATE_HOSTS=f"127.0.0.1:{public.port}",
        )
        urls = {
            "loopback": (secret.url("/secret"), "127.0.0.1 is a loopback address"),
            "metadata": (
                "http://169.254.169.254/latest/meta-data/",
                "169.254.169.254 is a cloud metadata address",
            ),
            "redirect": (public.url("/data.csv"), "127.0.0.1 is a loopback address"),
        }
        deals = {
            name: pool.match(params=deal_params(name, [url])) for name, (url, _) in urls.items()
        }
        ids = {name: deal.taskids()[0] for name, deal in deals.items()}
        pool.wait_tasks(list(ids.values()), _completed, timeout=120)
        text = error_text("DATA_DOWNLOAD_FAILED", ["INPUT_FILES_DOWNLOAD_FAILED"])
        for name, (_, why) in urls.items():
            (rep,) = pool.store.replicates_of(ids[name])
            assert why in rep["reason"] and "global addresses only" in rep["reason"], rep
            chain = pool.devnet.client.view_task(ids[name])
            assert _fetch_ipfs(ipfs_api_url, chain.results.decode()).read("error.txt") == (
                text.encode()
            )
        # Then nothing reached the node's loopback: the redirect was refused at its hop
        assert secret.requests == [] and public.requests == ["/data.csv"]
    finally:
        secret.close()
        public.close()


# ---- the node's own failures --------------------------------------------------------------------
def test_a_node_whose_docker_engine_stops_mid_deal_is_paused_and_its_tasks_complete_elsewhere(
    devnet: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    with pool_running(
        devnet,
        redis_url,
        ipfs_api_url,
        tmp_path,
        db="engine-down",
        WORKERPOOL_WORKER_MAX_FAILURES="2",
        WORKERPOOL_WORKER_PAUSE="600",
    ) as pool:
        # Given a node that reaches the Docker engine through a socket that will die
        proxy = EngineProxy(tmp_path / "engine.sock")
        broken = pool.worker_address(5)
        try:
            pool.start_worker(5, DOCKER_HOST=proxy.docker_host)
            deal = pool.match(app="sleep", params=deal_params("20"), volume=4)
            ids = deal.taskids()

            def computing() -> bool:
                reps = [pool.store.replicate(t, broken) for t in ids]
                busy = [r for r in reps if r and r["status"] == "COMPUTING"]
                return len(busy) == 2 and len(_containers(broken)) == 2

            wait_for(computing, 90, "the node to run two apps")
            # When its engine stops answering in the middle of the deal
            proxy.stop()
            pool.start_worker(6)
            # Then every task completes, computed by the other node
            pool.wait_tasks(ids, _completed, timeout=300)
            healthy = pool.devnet.accounts["workers"][6]["address"]
            for taskid in ids:
                assert pool.devnet.client.view_task(taskid).contributors == (healthy,)
            # And the broken node's replicates ended on its side, each with the reason
            reps = [r for t in ids if (r := pool.store.replicate(t, broken))]
            assert reps and all(r["status"] == "ABORTED" for r in reps)
            assert all("container engine failure" in r["reason"] for r in reps)
            # And it is PAUSED after WORKERPOOL_WORKER_MAX_FAILURES (2), as the API shows it
            record = pool.store.worker(broken) or {}
            assert record["pausedUntil"] > utcnow() and record.get("failures", 0) >= 2
            assert worker_view(record, 60, utcnow())["status"] == "PAUSED"
            planned = [
                e["note"]
                for t in ids
                for e in (pool.store.task(t) or {})["timeline"]
                if "failed on its side" in e.get("note", "")
            ]
            assert planned and all("container engine failure" in n for n in planned)
        finally:
            proxy.stop()
            _remove_containers(broken)  # what it could not remove without its engine


# ---- abort --------------------------------------------------------------------------------------
def test_a_replicate_no_longer_needed_is_stopped_after_consensus(
    running_pool: RunningPool, redis_url: str
) -> None:
    pool = running_pool
    # Given a slow node (a fiftieth of a CPU), which reaches Redis under another name (a node
    # on another host would): the other nodes never take its containers for their orphans
    slow = pool.worker_address(7)
    node = pool.start_worker(
        7,
        WORKERPOOL_APP_CPUS="0.02",
        WORKERPOOL_REDIS_URL=redis_url.replace("127.0.0.1", "localhost"),
    )
    # When a trust-2 task is computed there (counting that takes it some fifty seconds)
    deal = pool.match(app="spin", params=deal_params("400000"), trust=2)
    (taskid,) = deal.taskids()
    wait_for(
        lambda: (
            (r := pool.store.replicate(taskid, slow)) is not None
            and r["status"] == "COMPUTING"
            and _containers(slow)
        ),
        90,
        "the slow node's app to run",
    )
    # And its compute process stops answering (its container runs on): its replicate is
    # planned on the other nodes, which reach consensus without it
    os.kill(node.pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: (pool.store.replicate(taskid, slow) or {}).get("status") == "WORKER_LOST",
            60,
            "the slow replicate to be lost",
        )
        for n in (8, 9):
            pool.start_worker(n)
        wait_for(
            lambda: (pool.store.replicate(taskid, slow) or {}).get("status") == "ABORTED",
            120,
            "consensus without the slow replicate",
        )
        rep = pool.store.replicate(taskid, slow) or {}
        assert rep["timeline"][-1]["cause"] == "CONSENSUS_REACHED"
        # Then its node's control process stops the container, though the process that
        # started it is still frozen
        wait_for(lambda: not _containers(slow), 60, "the slow container to be stopped")
        assert slow not in [c.lower() for c in pool.devnet.client.view_task(taskid).contributors]
    finally:
        os.kill(node.pid, signal.SIGCONT)
    pool.wait_tasks([taskid], _completed, timeout=120)
    # And when it wakes up it deletes the task's folder and takes no part in the task
    folder = pool.tmp / "worker-7" / slow / taskid
    wait_for(lambda: not folder.exists(), 60, "the slow node to delete the task's folder")
    logs = (pool.tmp / "worker-7.log").read_text()
    assert f"task {taskid}: aborted (CONSENSUS_REACHED)" in logs


def test_a_sleeping_app_past_its_contribution_deadline_is_stopped(
    chain_snapshot: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    with pool_running(chain_snapshot, redis_url, ipfs_api_url, tmp_path, db="deadline") as pool:
        worker = pool.worker_address(11)
        pool.start_worker(11)
        deal = pool.match(app="sleep", params=deal_params("3600"))
        (taskid,) = deal.taskids()
        wait_for(
            lambda: (
                (r := pool.store.replicate(taskid, worker)) is not None
                and r["status"] == "COMPUTING"
                and _containers(worker)
            ),
            90,
            "the app to sleep",
        )
        # When the contribution deadline passes on chain (anvil's clock)
        chain_snapshot.increase_time(7 * TIMEREF + 5)
        # Then the task times out, the node stops the app and reports it ABORTED
        pool.wait_tasks([taskid], lambda d: d.get("status") == "CONTRIBUTION_TIMEOUT", 60)
        wait_for(lambda: not _containers(worker), 60, "the container to be stopped")
        rep = pool.store.replicate(taskid, worker) or {}
        assert rep["status"] == "ABORTED"
        assert rep["timeline"][-1]["cause"] == "CONTRIBUTION_TIMEOUT"
        folder = tmp_path / "worker-11" / worker / taskid
        wait_for(lambda: not folder.exists(), 60, "the node to delete the task's folder")


# ---- clean-up -----------------------------------------------------------------------------------
def test_100_tasks_on_one_node_failures_included_leave_its_work_directory_empty(
    running_pool: RunningPool,
) -> None:
    pool = running_pool
    worker = pool.worker_address(12)
    files = HttpServer()
    try:
        pool.start_worker(12)
        work = pool.tmp / "worker-12" / worker
        assert list(work.iterdir()) == []
        deals = [
            pool.match(volume=70, params=deal_params("many")),
            pool.match(app="crash", volume=10),
            pool.match(volume=10, params=deal_params("gone", [files.url("/gone.txt")])),
            pool.match(app="failwrite", volume=10, params=deal_params("2")),
        ]
        ids = [t for deal in deals for t in deal.taskids()]
        assert len(ids) == 100
        pool.wait_tasks(ids, _completed, timeout=900)

        def leftovers() -> list[str]:
            return sorted(p.name for p in work.iterdir())

        wait_for(lambda: leftovers() == [], 60, "the work directory to be empty")
        assert not [
            line for line in Path("/proc/mounts").read_text().splitlines() if str(work) in line
        ]
        assert _containers(worker) == []
        statuses = [r["timeline"] for t in ids for r in pool.store.replicates_of(t)]
        failed = sum(
            any(e["status"].endswith("_FAILED") for e in timeline) for timeline in statuses
        )
        assert failed == 20  # the crashes and the missing inputs: error results
    finally:
        files.close()
