"""A pool across hosts: the core (this namespace: the test's scheduler, Redis, the devnet's
chain node, IPFS) and worker hosts as network namespaces (``ops/hosts``), each worker node
on its own host reaching Redis, the chain and IPFS only over its link."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devnet_fixtures import DevnetHandle
from pool_fixtures import RunningPool, pool_running

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "ops") not in sys.path:
    sys.path.insert(0, str(ROOT / "ops"))

import hosts  # noqa: E402  (ops/hosts: the multi-host harness)


def require_hosts() -> None:
    """Fail (ops/test, CI) or skip (a bare local run) when namespaces cannot be made here."""
    why = hosts.netns_available()
    if why:
        from conftest import require_service

        require_service("network namespaces", why)


@dataclass
class PoolAcrossHosts:
    pool: RunningPool
    net: hosts.Hosts
    worker_env: dict[str, str]
    sentinel: hosts.SentinelGroup | None = None
    nodes: dict[int, Any] = field(default_factory=dict)  # worker host index -> its node

    def start_worker(self, n: int, host: int, **extra_env: str) -> Any:
        """Start devnet worker ``n`` on worker host ``host`` (1-based)."""
        env: dict[str, Any] = {**self.worker_env, **extra_env}
        proc = self.pool.start_worker(n, host=self.net.workers[host - 1], **env)
        self.nodes[host] = proc
        return proc


@contextmanager
def pool_across_hosts(
    devnet: DevnetHandle,
    ipfs_api_url: str,
    tmp: Path,
    *,
    workers: int = 3,
    shape: hosts.Shape | None = None,
    sentinel: bool = False,
    **extra_env: str,
) -> Iterator[PoolAcrossHosts]:
    """The core's Redis (a password required; or a Sentinel group), the chain node and IPFS
    published on the core's address, ``workers`` worker hosts, and the scheduler running
    here (``extra_env`` goes to the scheduler and every worker)."""
    require_hosts()
    with hosts.Hosts(workers, shape=shape, workdir=tmp / "hosts") as net:
        chain_port = net.publish(int(devnet.info["rpc_url"].rsplit(":", 1)[1]))
        ipfs_port = net.publish(int(ipfs_api_url.rsplit(":", 1)[1]))
        group = None
        if sentinel:
            group = net.start_sentinel_group()
            redis_url = group.url()
            extra_env = {
                "WORKERPOOL_REDIS_MASTER_NAME": group.master_name,
                "WORKERPOOL_REDIS_SENTINEL_PASSWORD": group.password,
                **extra_env,
            }
        else:
            redis_url = net.start_redis().url()
        worker_env = {
            "IEXEC_PRIVATE_CHAIN_ADDRESS": f"http://{net.core_ip}:{chain_port}",
            "IEXEC_IPFS_HOST": net.core_ip,
            "IEXEC_IPFS_PORT": str(ipfs_port),
        }
        scheduler_env: dict[str, Any] = dict(extra_env)  # (Any: not pool_running's store)
        with pool_running(
            devnet, redis_url, ipfs_api_url, tmp, db="hosts", **scheduler_env
        ) as pool:
            yield PoolAcrossHosts(pool, net, worker_env, group)
