"""One wallet, several senders: scheduler processes share the wallet's nonce in Redis, and a
node's refusal of a nonce or of fees is retried, never raised past the tick.

Devnet (anvil with PoCo), real redis-server; the schedulers are separate processes, each with
its own chain client and nonce counter, as two ``workerpool scheduler --no-beat`` consumers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from devnet_fixtures import DevnetHandle

from devnet.requester import match_deal
from poco.chain import ChainClient
from pool.nonces import RedisNonces
from scheduler.service import Scheduler

pytestmark = [pytest.mark.devnet, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]
PER_PROCESS = 25

# A scheduler process sending PER_PROCESS transactions with the scheduler wallet once the file
# argv[1] exists. "shared": built as `workerpool scheduler` builds it (scheduler.service.build,
# Redis nonces); "alone": a chain client without them (each process counts for itself). Both
# start from the nonce the node gives before anyone sends (the worst case: equal counters).
SENDER = """
import json, os, sys, time
from pool.messages import Messenger, make_celery
from pool.settings import Settings
from pool.wallets import chain_client, scheduler_key
from scheduler.service import build

settings = Settings.from_env()
if sys.argv[2] == "shared":
    scheduler = build(settings, Messenger(make_celery(settings)))
    client, wallet = scheduler.ctx.client, scheduler.ctx.wallet
else:
    client = chain_client(settings)
    wallet = client.wallet(scheduler_key(settings))
wallet.nonces.next_nonce = wallet._resync()
spender = sys.argv[3]
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
hashes = []
for i in range(int(sys.argv[4])):
    receipt = wallet.transact(client.hub.functions.approve(spender, i + 1))
    assert receipt.status == 1, receipt
    hashes.append(receipt.tx_hash)
print(json.dumps({"hashes": hashes, "refusals": dict(client.refusals)}))
"""


def _senders(
    devnet: DevnetHandle, redis_url: str, tmp_path: Path, mode: str
) -> list[dict[str, Any]]:
    go = tmp_path / f"go-{mode}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IEXEC_", "WORKERPOOL_"))},
        "PYTHONPATH": str(ROOT),
        "IEXEC_PRIVATE_CHAIN_ADDRESS": devnet.info["rpc_url"],
        "IEXEC_HUB_ADDRESS": devnet.info["hub"],
        "POOL_ADDRESS": devnet.info["workerpool"],
        "WORKERPOOL_DEVNET": "1",
        "IEXEC_CORE_WALLET_PRIVATE_KEY": devnet.key("scheduler"),
        "WORKERPOOL_REDIS_URL": redis_url,
        "MONGO_URL": "mongomock://",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SENDER,
                str(go),
                mode,
                devnet.address(role),
                str(PER_PROCESS),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("requester", "app_provider")
    ]
    time.sleep(3)  # both built, their nonce read, waiting at the start line
    go.write_text("go")
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def _nonces(devnet: DevnetHandle, hashes: list[str]) -> list[int]:
    return sorted(int(devnet.client.eth.get_transaction(h)["nonce"]) for h in hashes)


def test_two_scheduler_processes_sharing_one_wallet_send_50_transactions_without_a_nonce_error(
    devnet: DevnetHandle, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    first = int(devnet.client.eth.get_transaction_count(devnet.address("scheduler")))
    outputs = _senders(devnet, redis_url, tmp_path, "shared")
    hashes = [h for out in outputs for h in out["hashes"]]
    assert len(set(hashes)) == 2 * PER_PROCESS
    # every transaction mined, with the next nonce each, and no refusal by the node at all
    assert _nonces(devnet, hashes) == list(range(first, first + 2 * PER_PROCESS))
    assert [out["refusals"] for out in outputs] == [{}, {}]
    key = RedisNonces(redis_client, devnet.client.chain_id, devnet.address("scheduler"))
    assert key.load() == first + 2 * PER_PROCESS


def test_without_the_shared_nonce_they_collide_and_every_collision_is_retried(
    devnet: DevnetHandle, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    """What the Redis nonce prevents: the same two processes counting alone take the same
    nonces; the node refuses one of each pair, and each refusal is retried, not raised."""
    first = int(devnet.client.eth.get_transaction_count(devnet.address("scheduler")))
    outputs = _senders(devnet, redis_url, tmp_path, "alone")
    hashes = [h for out in outputs for h in out["hashes"]]
    assert _nonces(devnet, hashes) == list(range(first, first + 2 * PER_PROCESS))
    assert sum(out["refusals"].get("nonce", 0) for out in outputs) >= 1, outputs


def test_a_nonce_held_by_a_pending_transaction_is_retried_with_the_next(
    chain_snapshot: DevnetHandle,
) -> None:
    """ "replacement transaction underpriced": another process's transaction waits in the
    node's pool with our nonce. The sender takes the next one instead of failing."""
    devnet = chain_snapshot
    url = devnet.info["rpc_url"]
    # two clients, two nonce counters (another host name for the same node): two "processes"
    one = ChainClient(url, devnet.info["hub"]).wallet(devnet.key("scheduler"))
    other = ChainClient(url.replace("127.0.0.1", "localhost"), devnet.info["hub"])
    two = other.wallet(devnet.key("scheduler"))
    assert one.nonces is not two.nonces
    start = one._resync()
    one.nonces.next_nonce = two.nonces.next_nonce = start
    devnet.rpc("evm_setAutomine", [False])
    try:
        a = one.transact(
            one.client.hub.functions.approve(devnet.address("requester"), 1), wait=False
        )
        b = two.transact(
            two.client.hub.functions.approve(devnet.address("requester"), 2), wait=False
        )
        assert other.refusals == {"nonce": 1}
        devnet.rpc("evm_mine", [])
    finally:
        devnet.rpc("evm_setAutomine", [True])
    for tx_hash, nonce in ((a, start), (b, start + 1)):
        receipt = devnet.client.eth.get_transaction_receipt(tx_hash)
        assert receipt["status"] == 1
        assert devnet.client.eth.get_transaction(tx_hash)["nonce"] == nonce


def test_fees_the_node_refuses_fail_the_step_not_the_tick(
    chain_snapshot: DevnetHandle, make_scheduler: Callable[..., Scheduler]
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler()
    scheduler.tick()
    deal = match_deal(
        devnet.client,
        app=devnet.app("echo"),
        app_owner_key=devnet.key("app_provider"),
        workerpool=devnet.info["workerpool"],
        scheduler_key=devnet.key("scheduler"),
        requester_key=devnet.key("requester"),
    )
    wallet = scheduler.ctx.wallet
    base_fee = int(devnet.client.eth.get_block("latest")["baseFeePerGas"])
    devnet.rpc("anvil_setNextBlockBaseFeePerGas", [hex(100 * 10**9)])
    devnet.rpc("evm_mine", [])  # the base fee is 100 gwei now
    wallet.gas_price_multiplier = 0.1  # below the base fee, however often fees are read
    try:
        report = scheduler.tick()  # returns: the refusal is in the report
    finally:
        wallet.gas_price_multiplier = 1.0
        # anvil keeps its base fee across evm_revert: bring it back for the tests after
        devnet.rpc("anvil_setNextBlockBaseFeePerGas", [hex(base_fee)])
        devnet.rpc("evm_mine", [])
    (error,) = [e for e in report.errors if e.startswith("initialize")]
    assert "max fee per gas less than block base fee" in error
    assert scheduler.ctx.client.refusals["fees"] >= 1
    assert report.tasks_initialized == 0
    # a retryable refusal: the next ticks take the task back and initialize it
    reports = [scheduler.tick() for _ in range(2)]
    assert sum(r.tasks_initialized for r in reports) == 1
    assert devnet.client.view_task(deal.taskids()[0]).status.name == "ACTIVE"
