"""A fleet across hosts: worker hosts as network namespaces of this machine (``ops/hosts``),
each reaching the core's Redis (password required), chain node and IPFS over its own link.
Links are shaped (delay, loss), cut for a minute, and the Redis primary is killed under
Sentinel. Devnet, real redis-server (and Sentinels), dockerd, worker nodes as real
processes in their hosts."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from devnet_fixtures import DevnetHandle
from hosts_fixtures import PoolAcrossHosts, hosts, pool_across_hosts, require_hosts

from devnet.requester import deal_params
from poco.types import ChainTaskStatus, ContributionStatus
from pool.states import WorkerStatus
from scheduler.context import IN_FLIGHT

POOL_PRICE = 10_000_000


def _completed(doc: dict[str, Any]) -> bool:
    return doc.get("status") == "COMPLETED"


def _assert_completed_once_per_worker(fleet: PoolAcrossHosts, taskids: list[str]) -> None:
    """Every task COMPLETED on chain, its contributions from distinct workers, and never two
    replicates of one task for one worker in the store."""
    client = fleet.pool.devnet.client
    for taskid in taskids:
        chain = client.view_task(taskid)
        assert chain.status == ChainTaskStatus.COMPLETED, taskid
        contributors = [c.lower() for c in chain.contributors]
        assert len(contributors) == len(set(contributors)), contributors
        reps = fleet.pool.store.replicates_of(taskid)
        workers = [r["worker"] for r in reps]
        assert len(workers) == len(set(workers)), workers
        proved = [
            w
            for w in contributors
            if client.view_contribution(taskid, w).status == ContributionStatus.PROVED
        ]
        assert len(proved) >= chain.winner_counter >= 1


# ---- the harness itself (no devnet) -----------------------------------------------------------
def _names(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    links = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [
        n for n in links + [s.split()[0] for s in spaces.splitlines() if s] if n.startswith(prefix)
    ]


def test_links_carry_cut_and_shape_traffic_and_everything_is_removed_after(
    tmp_path: Path,
) -> None:
    require_hosts()
    net = hosts.Hosts(2, workdir=tmp_path / "hosts")
    prefix, core = net.prefix, net.core_ip
    with pytest.raises(RuntimeError, match="on purpose"), net:
        redis = net.start_redis()
        w1, w2 = net.workers
        # Given Redis on the core: each worker host reaches it over its link, password needed
        assert w1.reaches(core, redis.port) and w2.reaches(core, redis.port)
        cli = ["redis-cli", "-h", core, "-p", str(redis.port)]
        assert "NOAUTH" in w1.run([*cli, "ping"])
        assert w1.run([*cli, "--no-auth-warning", "-a", redis.password, "ping"]).strip() == "PONG"
        # When one link is cut, that host reaches nothing; the other still does
        w1.cut()
        assert w1.is_cut
        assert not w1.reaches(core, redis.port)
        assert w2.reaches(core, redis.port)
        # and when it comes back, so does the traffic
        w1.restore()
        assert w1.reaches(core, redis.port)
        # A shaped link (delay, loss) still carries a whole conversation
        w2.set_shape(hosts.Shape(delay=0.05, jitter=0.01, loss=0.05))
        for _ in range(5):
            assert (
                w2.run([*cli, "--no-auth-warning", "-a", redis.password, "ping"]).strip() == "PONG"
            )
        pid = redis.proc.pid
        raise RuntimeError("on purpose: the harness must clean up after a failure")
    # Then nothing of it is left: names, the core's address, the route, the processes
    assert _names(prefix) == []
    lo = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True)
    assert f" {core}/" not in lo.stdout
    route = subprocess.run(
        ["ip", "route", "show", "type", "blackhole", str(net.subnet)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert route.stdout.strip() == ""
    assert not Path(f"/proc/{pid}").exists()


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path: Path) -> None:
    require_hosts()
    probe = hosts.Hosts(1, workdir=tmp_path / "a")
    # Given what a run killed with -9 leaves: a namespace, a link, a process inside
    name = f"{probe.prefix}w9"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(
        ["ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}n"], check=True
    )
    sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
    route = ["blackhole", str(probe.subnet), "metric", hosts.harness.ROUTE_METRIC]
    subprocess.run(["ip", "route", "add", *route], check=True)
    try:
        # When the next run starts
        with hosts.Hosts(1, workdir=tmp_path / "b"):
            # Then they are gone before it builds its own
            assert name not in _names(probe.prefix)
            assert sleeper.wait(timeout=10) != 0
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{name}h"], capture_output=True)
        subprocess.run(["ip", "route", "del", *route], capture_output=True)
    assert _names(probe.prefix) == []


# ---- a pool across hosts ----------------------------------------------------------------------
@pytest.mark.devnet
@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.timeout(420)
def test_three_worker_hosts_complete_a_trust2_deal_over_slow_lossy_links(
    devnet: DevnetHandle, ipfs_api_url: str, app_images: dict[str, str], tmp_path: Path
) -> None:
    # Given 3 worker hosts whose links add 50 ms each way and lose 1 % of packets
    shape = hosts.Shape(delay=0.05, loss=0.01)
    with pool_across_hosts(
        devnet, ipfs_api_url, tmp_path, shape=shape, WORKER_LOST_TIMEOUT="10"
    ) as fleet:
        for host in (1, 2, 3):
            fleet.start_worker(host - 1, host)
        # When a trust-2 deal is matched
        deal = fleet.pool.match(volume=3, trust=2, workerpoolprice=POOL_PRICE)
        fleet.pool.wait_tasks(deal.taskids(), _completed, timeout=300)
        # Then every task completes, with distinct contributors, and no node was judged lost
        _assert_completed_once_per_worker(fleet, deal.taskids())
        lost = list(fleet.pool.store.workers.find({"status": str(WorkerStatus.LOST)}))
        assert lost == []
        # a node in a namespace of its own (`ip netns exec` gives it its own mounts) mounts the
        # output where the engine does not look: it says so once and measures the output
        said = []
        for log_file in fleet.pool.logs:
            text = log_file.read_text(errors="replace")
            said.append(text.count("the Docker Engine does not see the filesystem mounted"))
            assert "node-side failure" not in text, text
        assert max(said) == 1 and len(said) == 3, said


def _worker_record(fleet: PoolAcrossHosts, n: int) -> dict[str, Any]:
    return fleet.pool.store.workers.find_one({"address": fleet.pool.worker_address(n)}) or {}


def _wait(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(0.2)


CUT_SECONDS = 60


@pytest.mark.devnet
@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.timeout(600)
def test_a_host_cut_for_a_minute_is_replanned_then_rejoins_and_takes_new_jobs(
    devnet: DevnetHandle, ipfs_api_url: str, app_images: dict[str, str], tmp_path: Path
) -> None:
    with pool_across_hosts(devnet, ipfs_api_url, tmp_path, WORKER_LOST_TIMEOUT="15") as fleet:
        pool = fleet.pool
        for host in (1, 2, 3):
            fleet.start_worker(host - 1, host)
        cut_worker = pool.worker_address(0)  # on host 1
        # Given a trust-2 deal under way, host 1 computing one of its replicates
        deal = pool.match(
            app="sleep", volume=4, trust=2, params=deal_params("6"), workerpoolprice=POOL_PRICE
        )
        ids = deal.taskids()

        def host1_busy() -> list[str]:
            return [
                t
                for t in ids
                if (r := pool.store.replicate(t, cut_worker)) and r["status"] in IN_FLIGHT
            ]

        _wait("computing on host 1", host1_busy, timeout=120)
        # When its link is cut for a minute
        cut_at = time.monotonic()
        with fleet.net.cut(fleet.net.workers[0]):
            cut_tasks = host1_busy()

            # Then the scheduler judges it lost, marks its replicates WORKER_LOST, plans them
            # on the other hosts, and every task completes without it
            def judged_lost() -> bool:
                reps = [pool.store.replicate(t, cut_worker) or {} for t in cut_tasks]
                return _worker_record(fleet, 0).get("status") == str(WorkerStatus.LOST) and all(
                    r.get("status") == "WORKER_LOST" for r in reps
                )

            _wait("host 1 judged lost", judged_lost, timeout=120)
            # (the link stays cut for a minute, or until the deal is done if that is later)
            pool.wait_tasks(ids, _completed, timeout=240)
            time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
        _assert_completed_once_per_worker(fleet, ids)
        for taskid in cut_tasks:
            winners = [
                r["worker"] for r in pool.store.replicates_of(taskid) if r["status"] == "COMPLETED"
            ]
            assert winners and cut_worker not in winners, winners
        # And when the link returns, the node is back and takes new jobs: the only node
        # left serves a new deal
        _wait(
            "host 1 back",
            lambda: _worker_record(fleet, 0).get("status") == str(WorkerStatus.ALIVE),
            timeout=120,
        )
        for host in (2, 3):
            pool.kill_worker(fleet.nodes[host])
        again = pool.match(workerpoolprice=POOL_PRICE)
        pool.wait_tasks(again.taskids(), _completed, timeout=180)
        _assert_completed_once_per_worker(fleet, again.taskids())
        rep = pool.store.replicate(again.taskids()[0], cut_worker)
        assert rep is not None and rep["status"] == "COMPLETED", rep
        # its replicates of the first deal never counted twice: whatever it did after the
        # link returned, each task has at most one replicate of it and one contribution
        for taskid in ids:
            contributors = [c.lower() for c in pool.devnet.client.view_task(taskid).contributors]
            assert contributors.count(cut_worker) <= 1


@pytest.mark.devnet
@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.timeout(480)
def test_a_deal_completes_when_the_redis_primary_is_killed_under_sentinel(
    devnet: DevnetHandle, ipfs_api_url: str, app_images: dict[str, str], tmp_path: Path
) -> None:
    # Given a pool whose broker is a Redis primary and replica under three Sentinels
    with pool_across_hosts(
        devnet, ipfs_api_url, tmp_path, sentinel=True, WORKER_LOST_TIMEOUT="30"
    ) as fleet:
        assert fleet.sentinel is not None
        pool = fleet.pool
        for host in (1, 2, 3):
            fleet.start_worker(host - 1, host)
        deal = pool.match(
            app="sleep", volume=4, trust=2, params=deal_params("4"), workerpoolprice=POOL_PRICE
        )
        ids = deal.taskids()

        def computing() -> bool:
            return any(r["status"] == "COMPUTING" for t in ids for r in pool.store.replicates_of(t))

        _wait("a replicate computing", computing, timeout=120)
        # When the primary is killed mid-deal
        old = fleet.sentinel.kill_primary()
        new = fleet.sentinel.wait_failover(old)
        assert new is not old
        # Then the deal completes: every task, distinct contributors, no node judged lost
        pool.wait_tasks(ids, _completed, timeout=300)
        _assert_completed_once_per_worker(fleet, ids)
        assert [w["status"] for w in pool.store.workers.find()] == ["ALIVE"] * 3
