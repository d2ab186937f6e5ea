"""What a requester gets, on the devnet with real workers, a real IPFS node and the real iExec
SDK from npm (``iexec`` 9.0.1): iexec-core's task routes and logs read by ``iexec task
debug``, the Compass-shaped discovery, requests the pool refuses before anything runs,
callbacks delivered on chain, and results fetched through the IPFS gateway."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from api_support import serve, wait_for
from conftest import require_service
from eth_account import Account
from pool_fixtures import RunningPool

from api.app import create_app
from devnet.network import cache_dir
from devnet.requester import deal_params
from orders.challenge import authorization_header
from poco.actions import CONTRIBUTE_AND_FINALIZE_GAS, FINALIZE_GAS
from poco.results import parse_result_link
from poco.types import ChainTaskStatus
from pool.settings import Settings

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]
SDK = "iexec@9.0.1"
SOLC = "solc@0.8.30"
CONSUMER = json.loads((ROOT / "tests" / "contracts" / "consumer.json").read_text())
STORE, REVERT, BURN = 0, 1, 2  # the consumer's modes (tests/contracts/Consumer.sol)


# ---- tools from npm -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def node_modules() -> Path:
    """The iExec SDK and solc from npm, installed once in the tools cache (as anvil is)."""
    root = cache_dir() / "requester-tools"
    modules = root / "node_modules"
    if not (modules / ".bin" / "iexec").exists() or not (modules / "solc").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        (root / "package.json").write_text('{"name": "requester-tools", "private": true}')
        proc = subprocess.run(
            ["npm", "install", SDK, SOLC, "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            require_service("npm packages", f"npm install {SDK} {SOLC}: {proc.stderr[-1000:]}")
    return modules


@dataclass
class Requester:
    """The iExec SDK's CLI in a folder holding its chain.json and the requester's wallet."""

    bin: Path
    folder: Path

    def run(self, *args: str) -> dict[str, Any]:
        proc = subprocess.run(
            [str(self.bin), *args, "--raw"],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "NO_COLOR": "1"},
        )
        lines = proc.stdout.strip().splitlines()
        assert lines, f"iexec {' '.join(args)} printed nothing: {proc.stderr[-2000:]}"
        answer: dict[str, Any] = json.loads(lines[-1])
        return answer


def _requester(
    node_modules: Path, folder: Path, pool: RunningPool, api: str, gateway: str, key: str
) -> Requester:
    folder.mkdir(parents=True, exist_ok=True)
    chain = {
        "id": str(pool.devnet.client.chain_id),
        "host": pool.devnet.info["rpc_url"],
        "hub": pool.devnet.info["hub"],
        "compass": api,  # the pool's API is its own Compass
        "ipfsGateway": gateway,
    }
    (folder / "chain.json").write_text(json.dumps({"default": "dev", "chains": {"dev": chain}}))
    sdk = Requester(node_modules / ".bin" / "iexec", folder)
    assert sdk.run("wallet", "import", key, "--unencrypted", "--force")["ok"]
    return sdk


@pytest.fixture
def api(running_pool: RunningPool) -> Iterator[str]:
    """The pool's API over real HTTP, reading the running pool's store."""
    settings = Settings.from_env(running_pool.env)
    with serve(create_app(settings, running_pool.store)) as url:
        yield url


def _pins(ipfs_api_url: str) -> set[str]:
    answer = requests.post(
        f"{ipfs_api_url}/api/v0/pin/ls", params={"type": "recursive"}, timeout=10
    )
    answer.raise_for_status()
    keys: set[str] = set()
    for line in answer.text.splitlines():
        body = json.loads(line)
        keys |= set(body.get("Keys") or {})
        if body.get("Cid"):
            keys.add(body["Cid"])
    return keys


def _replicates_done(pool: RunningPool, taskid: str, statuses: set[str]) -> bool:
    reps = pool.store.replicates_of(taskid)
    return bool(reps) and all(r["status"] in statuses for r in reps)


# ---- routes, logs and the SDK ------------------------------------------------------------------
def test_sdk_reads_core_routes_and_only_the_requester_gets_logs(
    running_pool: RunningPool,
    api: str,
    node_modules: Path,
    ipfs_api_url: str,
    ipfs_gateway_url: str,
    tmp_path: Path,
) -> None:
    pool = running_pool
    devnet = pool.devnet
    worker = pool.worker_address(0)
    pool.start_worker(0)
    # Given a completed task and a task whose app failed
    done = pool.match(params=deal_params("hello requester")).taskids()[0]
    failed = pool.match(app="crash", params=deal_params("x")).taskids()[0]
    # (the crash ends with iexec-worker's error result: the task completes)
    pool.wait_tasks([done, failed], lambda d: d.get("status") == "COMPLETED")
    requester = _requester(
        node_modules,
        tmp_path / "requester",
        pool,
        api,
        ipfs_gateway_url,
        devnet.key("requester"),
    )

    # When the requester's SDK debugs the tasks (Compass = the pool's API, then /tasks/{id})
    debug = requester.run("task", "debug", done)
    assert debug["ok"], debug
    assert debug["onchainData"]["status"] == 3  # COMPLETED on chain
    offchain = debug["offchainData"]
    assert offchain["task"]["status"] == "COMPLETED"
    assert [c["status"] for c in offchain["task"]["statusHistory"]][-1] == "COMPLETED"
    (replicate,) = offchain["replicates"]
    assert replicate["worker"] == worker and replicate["status"] == "COMPLETED"
    statuses = [u["status"] for u in replicate["statusHistory"]]
    assert statuses[0] == "CREATED" and "COMPUTED" in statuses
    crash = requester.run("task", "debug", failed)
    (crashed,) = crash["offchainData"]["replicates"]
    assert crashed["status"] == "COMPLETED" and crashed["exitCode"] == 3
    (failure,) = [u for u in crashed["statusHistory"] if u["status"] == "COMPUTE_FAILED"]
    assert failure["cause"] == "APP_COMPUTE_FAILED"

    # Then with --logs it gets each worker's stdout and stderr (signed challenge)
    logs = requester.run("task", "debug", done, "--logs")
    assert logs["ok"], logs
    (entry,) = logs["appLogs"]
    assert entry["worker"] == worker
    assert f"echo app: task {done} wrote" in entry["stdout"]
    crash_logs = requester.run("task", "debug", failed, "--logs")["appLogs"]
    assert crash_logs[0]["stdout"] == "crash app: starting\n"
    assert crash_logs[0]["stderr"] == "boom: something went wrong\n"

    # Another address signing its own challenge gets 403; nobody gets logs anonymously
    stranger_key = devnet.key("app_provider")
    stranger = Account.from_key(stranger_key).address
    typed = requests.get(f"{api}/tasks/logs/challenge?address={stranger}", timeout=10).json()
    header = authorization_header(typed, stranger_key)
    for taskid in (done, failed):
        refused = requests.get(
            f"{api}/tasks/{taskid}/logs", headers={"Authorization": header}, timeout=10
        )
        assert refused.status_code == 403
        assert requests.get(f"{api}/tasks/{taskid}/logs", timeout=10).status_code == 400
    anonymous = [
        f"/tasks/{done}",
        f"/tasks/{done}/replicates/{worker}",
        f"/tasks/{failed}",
        f"/tasks/{failed}/replicates/{worker}",
        f"/api/v1/tasks/{done}",
        "/api/v1/tasks",
        f"/api/v1/workers/{worker}",
        f"/api/v1/deals/{devnet.client.view_task(done).dealid}",
    ]
    for path in anonymous:
        body = requests.get(api + path, timeout=10).text
        assert "echo app: task" not in body, path
        if path.startswith("/tasks/"):
            assert "boom" not in body and "crash app" not in body, path

    # The core routes' models, field by field, as iexec-core's Java client reads them
    task = requests.get(f"{api}/tasks/{done}", timeout=10).json()
    assert task["currentStatus"] == "COMPLETED" and task["trust"] == 1
    assert task["dappName"] == "workerpool-apps/echo:1"
    assert task["commandLine"] == "hello requester"
    assert task["resultLink"] == devnet.client.view_task(done).results.decode()
    (rep,) = task["replicates"]
    assert rep["appLogs"] == f"{api}/tasks/{done}/replicates/{worker}/logs"

    # And the result the SDK downloads through the pool's IPFS gateway is what the app wrote
    download = requester.run("task", "show", done, "--download", "result")
    assert download["ok"], download
    archive = zipfile.ZipFile(requester.folder / "result.zip")
    result = archive.read("result.txt").decode()
    assert result.startswith("args: hello requester\n") and f"IEXEC_TASK_ID={done}" in result
    _, location = parse_result_link(devnet.client.view_task(done).results.decode())
    through_gateway = requests.get(f"{ipfs_gateway_url}{location}", timeout=30)
    assert through_gateway.status_code == 200
    assert through_gateway.content == (requester.folder / "result.zip").read_bytes()
    assert zipfile.ZipFile(io.BytesIO(through_gateway.content)).read("result.txt").decode() == (
        result
    )
    assert location.removeprefix("/ipfs/") in _pins(ipfs_api_url)

    # The logs are kept until IEXEC_LOGS_AVAILABILITY_PERIOD_IN_DAYS after the final deadline
    final = (pool.store.task(done) or {})["finalDeadline"]
    kept = pool.store.task_logs.find_one({"chainTaskId": done}) or {}
    assert kept["expiresAt"] == dt.datetime.fromtimestamp(final, dt.UTC).replace(
        tzinfo=None
    ) + dt.timedelta(days=3)


def test_discovery_route_answers_for_this_pool_and_404_for_another(
    running_pool: RunningPool, api: str
) -> None:
    chain_id = running_pool.devnet.client.chain_id
    pool = running_pool.devnet.info["workerpool"]
    found = requests.get(f"{api}/{chain_id}/workerpools/{pool}", timeout=10)
    assert found.status_code == 200 and found.json()["apiUrl"] == api
    other = requests.get(f"{api}/{chain_id}/workerpools/0x{'12' * 20}", timeout=10)
    assert other.status_code == 404 and isinstance(other.json()["error"], str)
    assert requests.get(f"{api}/{chain_id + 1}/workerpools/{pool}", timeout=10).status_code == 404


# ---- refusals ----------------------------------------------------------------------------------
def test_encryption_and_dropbox_requests_are_refused_before_anything_runs(
    running_pool: RunningPool, api: str, ipfs_api_url: str
) -> None:
    """The SDK refuses to sign such request orders for a standard task; a requester may still
    write them by hand (here with our own order code): the pool refuses them."""
    pool = running_pool
    pool.start_worker(0)
    pins = _pins(ipfs_api_url)
    encrypted = pool.match(params=deal_params("secret", iexec_result_encryption=True)).taskids()[0]
    dropbox = pool.match(
        params=deal_params("box", iexec_result_storage_provider="dropbox")
    ).taskids()[0]
    for taskid, why in ((encrypted, "iexec_result_encryption"), (dropbox, "dropbox")):
        wait_for(lambda t=taskid: _replicates_done(pool, t, {"START_FAILED"}), 90, "refusal")
        (rep,) = pool.store.replicates_of(taskid)
        # nothing ran: the image was not even pulled
        assert [e["status"] for e in rep["timeline"]] == ["CREATED", "STARTING", "START_FAILED"]
        assert why in rep["reason"]
        # the reason as iExec clients read it
        model = requests.get(f"{api}/tasks/{taskid}", timeout=10).json()
        (replicate,) = model["replicates"]
        assert replicate["currentStatus"] == "START_FAILED"
        assert replicate["statusUpdateList"][-1] == {
            "status": "START_FAILED",
            "date": replicate["statusUpdateList"][-1]["date"],
            "cause": "TASK_DESCRIPTION_INVALID",
        }
        ours = requests.get(f"{api}/api/v1/tasks/{taskid}", timeout=10).json()
        assert why in ours["replicates"][0]["reason"]
        # the refusal is deterministic: no other worker is sent to try
        assert (pool.store.task(taskid) or {})["replicatesNeeded"] == 1
    assert _pins(ipfs_api_url) == pins
    # no app container was started (the runner logs each run it finishes)
    assert not any("finished in" in log.read_text() for log in pool.logs if log.exists())


# ---- callbacks ----------------------------------------------------------------------------------
def _deploy_consumer(pool: RunningPool, mode: int) -> Any:
    w3 = pool.devnet.client.w3
    account = Account.from_key(pool.devnet.key("deployer"))
    factory = w3.eth.contract(abi=CONSUMER["abi"], bytecode=CONSUMER["bytecode"])
    data = factory.constructor(mode).build_transaction(
        {"from": account.address, "gas": 1_000_000, "nonce": 0}
    )["data"]
    base = w3.eth.get_block("latest")["baseFeePerGas"]
    tx = {
        "from": account.address,
        "data": data,
        "gas": 1_000_000,
        "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "chainId": w3.eth.chain_id,
        "maxFeePerGas": 2 * base + 10**9,
        "maxPriorityFeePerGas": 10**9,
        "type": 2,
    }
    signed = account.sign_transaction(tx)
    receipt = w3.eth.wait_for_transaction_receipt(
        w3.eth.send_raw_transaction(signed.raw_transaction)
    )
    assert receipt["status"] == 1
    return w3.eth.contract(address=receipt["contractAddress"], abi=CONSUMER["abi"])


def test_callback_data_reaches_the_consumer_for_trust_1_and_2_and_a_reverting_one_costs_nothing(
    running_pool: RunningPool, api: str
) -> None:
    pool = running_pool
    devnet = pool.devnet
    hub = devnet.info["hub"]
    pool.start_worker(0)
    pool.start_worker(1)
    consumer = _deploy_consumer(pool, STORE)
    reverting = _deploy_consumer(pool, REVERT)
    burning = _deploy_consumer(pool, BURN)
    # Given callback deals: trust 1 (contributeAndFinalize by the worker), trust 2 (finalize
    # by the scheduler), and trust 1 to consumers that revert and that burn all their gas
    deals = {
        "one": pool.match(
            app="callback", trust=1, callback=consumer.address, params=deal_params("trust one")
        ),
        "two": pool.match(
            app="callback", trust=2, callback=consumer.address, params=deal_params("trust two")
        ),
        "reverts": pool.match(
            app="callback", trust=1, callback=reverting.address, params=deal_params("no")
        ),
        "burns": pool.match(
            app="callback", trust=1, callback=burning.address, params=deal_params("burn")
        ),
    }
    taskids = {name: deal.taskids()[0] for name, deal in deals.items()}
    sent = {"one": b"trust one", "two": b"trust two", "reverts": b"no", "burns": b"burn"}
    # When the pool runs them, Then every task is COMPLETED, in the store and on chain
    pool.wait_tasks(list(taskids.values()), lambda d: d.get("status") == "COMPLETED", 180)
    for name, taskid in taskids.items():
        chain = devnet.client.view_task(taskid)
        assert chain.status == ChainTaskStatus.COMPLETED, name
        callback = deals[name].requestorder.callback
        assert chain.results.decode() == f'{{ "storage": "ethereum", "location": "{callback}" }}'
        assert chain.results_callback == sent[name]
        model = requests.get(f"{api}/tasks/{taskid}", timeout=10).json()
        assert model["chainCallbackData"] == "0x" + chain.results_callback.hex()
    # And the consumer received each callback-data from PoCo
    for name, text in (("one", b"trust one"), ("two", b"trust two")):
        key = bytes.fromhex(taskids[name][2:])
        assert consumer.functions.results(key).call() == text
        assert consumer.functions.callers(key).call() == hub
    # a reverting consumer and one out of gas kept nothing, and cost the pool no task
    assert reverting.functions.results(bytes.fromhex(taskids["reverts"][2:])).call() == b""
    assert burning.functions.results(bytes.fromhex(taskids["burns"][2:])).call() == b""
    assert burning.functions.burnt().call() == 0  # its loop was undone with its call
    trust2 = pool.store.task(taskids["two"]) or {}
    assert [e["status"] for e in trust2["timeline"]][-2:] == ["FINALIZED", "COMPLETED"]
    # each transaction that ran a callback carried the gas PoCo hands it, and more
    callback_gas = devnet.client.callback_gas()
    assert callback_gas == 100_000
    finalize = next(e["txHash"] for e in trust2["timeline"] if e["status"] == "FINALIZED")
    assert devnet.client.w3.eth.get_transaction(finalize)["gas"] >= (
        FINALIZE_GAS + callback_gas * 64 // 63
    )
    for name in ("one", "reverts", "burns"):
        (rep,) = pool.store.replicates_of(taskids[name])
        tx = next(e["txHash"] for e in rep["timeline"] if e["status"] == "COMPLETED")
        assert devnet.client.w3.eth.get_transaction(tx)["gas"] >= (
            CONTRIBUTE_AND_FINALIZE_GAS + callback_gas * 64 // 63
        )


def test_consumer_bytecode_is_its_source_compiled(node_modules: Path) -> None:
    """tests/contracts/consumer.json is what solc makes of Consumer.sol (no hand-made bytes)."""
    proc = subprocess.run(
        ["node", str(ROOT / "tests" / "contracts" / "compile.mjs"), str(node_modules)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == CONSUMER
