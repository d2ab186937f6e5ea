"""iexec-core's compose settings mean here what they mean there.

The environment block of iexec-core's scheduler service (its docker-compose guide) is pasted
as is; only the values an operator fills in for their own pool are replaced by the devnet's
(keystore path, chain node, hub, pool, chain id), and what this machine lacks is added
(MongoDB: the in-memory store; Redis: the test server). It must start the scheduler, which
names once each setting that has no effect here, with the reason, and publishes the chain
URL its worker nodes use (IEXEC_PUBLIC_CHAIN_ADDRESS). A node without a chain URL of its own
takes it from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from devnet_fixtures import DevnetHandle
from eth_account import Account
from eth_typing import HexStr

from pool import keys
from pool.messages import Messenger, make_celery
from pool.settings import Settings, public_config, with_public_config, without_effect
from scheduler.service import build

ROOT = Path(__file__).resolve().parents[1]

# iexec-core's scheduler service, `environment:` of its compose file (indentation as found,
# REVEAL_TIMEOUT_PERIOD one space off)
SEED_BLOCK = """
      - IEXEC_CORE_WALLET_PATH=/iexec-wallet/wallet.json
      - IEXEC_CORE_WALLET_PASSWORD=myWalletPassw0rd
      - IEXEC_PRIVATE_CHAIN_ADDRESS=https://my-jsonrpc-enabled-ethereum-node.com
      - IEXEC_PUBLIC_CHAIN_ADDRESS=https://my-default-public-ethereum-node-for-workers.com
      - IEXEC_HUB_ADDRESS=0xiexechubaddress
      - POOL_ADDRESS=0xmyworkerpool
      - IEXEC_START_BLOCK_NUMBER=0
       - REVEAL_TIMEOUT_PERIOD=120000
      - IEXEC_ASK_REPLICATE_PERIOD=30000
      - IEXEC_RESULT_REPOSITORY_HOST=my-workerpool.com
      - IEXEC_RESULT_REPOSITORY_PORT=18090
      - IEXEC_CHAIN_ID=42
      - MONGO_HOST=mongo
      - IEXEC_IPFS_HOST=ipfs
      - IEXEC_IPFS_PORT=5001
      - IEXEC_CORE_PORT=18090
      - IEXEC_SMS_HOST=http://my-sms.com
"""
PUBLIC_NODE = "https://my-default-public-ethereum-node-for-workers.com"
WITHOUT_EFFECT = {
    "IEXEC_ASK_REPLICATE_PERIOD": "nodes do not poll the scheduler for work",
    "IEXEC_SMS_HOST": "this pool runs no TEE task",
    "IEXEC_RESULT_REPOSITORY_HOST": "results are published to IPFS",
    "IEXEC_RESULT_REPOSITORY_PORT": "results are published to IPFS",
}


def seed_environment() -> dict[str, str]:
    """The block as docker compose reads a list of `- KEY=VALUE` lines."""
    env = {}
    for line in SEED_BLOCK.strip().splitlines():
        key, _, value = line.strip().removeprefix("- ").partition("=")
        env[key] = value
    return env


def base_env() -> dict[str, str]:
    """This process's environment without any pool setting (tests run under ops/test)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("IEXEC_", "WORKERPOOL_"))}


def keystore(tmp_path: Path, key: str, password: str) -> Path:
    path = tmp_path / "wallet.json"
    path.write_text(json.dumps(Account.encrypt(HexStr(key), password, iterations=2)))
    return path


def seed_on_devnet(devnet: DevnetHandle, tmp_path: Path, redis_url: str) -> dict[str, str]:
    """The seed block with the operator's own values filled in for the devnet."""
    env = seed_environment()
    env.update(
        IEXEC_CORE_WALLET_PATH=str(
            keystore(tmp_path, devnet.key("scheduler"), env["IEXEC_CORE_WALLET_PASSWORD"])
        ),
        IEXEC_PRIVATE_CHAIN_ADDRESS=devnet.info["rpc_url"],
        IEXEC_HUB_ADDRESS=devnet.info["hub"],
        POOL_ADDRESS=devnet.info["workerpool"],
        IEXEC_CHAIN_ID=str(devnet.client.chain_id),
    )
    # what this machine has instead of the compose services
    env.update(MONGO_URL="mongomock://", WORKERPOOL_REDIS_URL=redis_url)
    return env


class Output:
    """What a process prints (stdout and stderr merged), collected by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        threading.Thread(target=lambda: self.lines.extend(stream), daemon=True).start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def until(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.text:
                return self.text
            if self.proc.poll() is not None:
                time.sleep(0.5)  # the last lines
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{marker!r} not printed (exit {self.proc.poll()}):\n{self.text[-4000:]}"
        )


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        env={**base_env(), **env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- without a chain --------------------------------------------------------------------------
def test_the_seed_block_parses_and_names_what_has_no_effect_here() -> None:
    env = seed_environment()
    assert len(env) == 17
    filled = {
        **env,
        "IEXEC_HUB_ADDRESS": "0x" + "11" * 20,
        "POOL_ADDRESS": "0x" + "22" * 20,
    }
    settings = Settings.from_env(filled)
    assert settings.public_chain_url == PUBLIC_NODE
    assert settings.ask_replicate_period == 30000
    assert settings.result_repository() == "http://my-workerpool.com:18090"
    notes = dict(without_effect(settings, filled))
    assert set(notes) == set(WITHOUT_EFFECT)
    for name, reason in WITHOUT_EFFECT.items():
        assert reason in notes[name], notes[name]
    # with local results the repository is where they are served from, and nodes get it
    local = Settings.from_env({**filled, "WORKERPOOL_RESULT_STORAGE": "local"})
    assert local.result_base_url() == "http://my-workerpool.com:18090"
    assert public_config(local, 42)["resultBaseUrl"] == "http://my-workerpool.com:18090"
    assert "IEXEC_RESULT_REPOSITORY_HOST" not in dict(without_effect(local, filled))
    # WORKERPOOL_PUBLIC_URL wins over the repository
    both = Settings.from_env(
        {**filled, "WORKERPOOL_RESULT_STORAGE": "local", "WORKERPOOL_PUBLIC_URL": "https://p.io"}
    )
    assert both.result_base_url() == "https://p.io"
    assert (
        "WORKERPOOL_PUBLIC_URL is set"
        in dict(without_effect(both, filled))["IEXEC_RESULT_REPOSITORY_PORT"]
    )
    # with TDX the seed's SMS is the SMS of TDX tasks (scheduler, nodes), unless a URL of
    # WORKERPOOL_SMS_TDX_URL wins over it; TDX also needs a result proxy
    with pytest.raises(ValueError, match="needs WORKERPOOL_RESULT_PROXY_URL"):
        Settings.from_env({**filled, "WORKERPOOL_TEE_STACK": "tdx"})
    tdx = {**filled, "WORKERPOOL_TEE_STACK": "tdx", "WORKERPOOL_RESULT_PROXY_URL": "http://r.io"}
    tee = Settings.from_env(tdx)
    assert tee.tdx_sms_url() == "http://my-sms.com"
    assert "IEXEC_SMS_HOST" not in dict(without_effect(tee, tdx))
    assert public_config(tee, 42)["smsTdxUrl"] == "http://my-sms.com"
    own = Settings.from_env({**tdx, "WORKERPOOL_SMS_TDX_URL": "http://tdx-sms.io"})
    assert own.tdx_sms_url() == "http://tdx-sms.io"
    assert "WORKERPOOL_SMS_TDX_URL is set" in dict(without_effect(own, tdx))["IEXEC_SMS_HOST"]
    node = Settings.from_env({**filled, "WORKERPOOL_WORKER_TDX": "simulation"})
    assert "IEXEC_SMS_HOST" not in dict(without_effect(node, filled, "worker"))
    with pytest.raises(ValueError, match="run no SGX enclave"):
        Settings.from_env({**tdx, "WORKERPOOL_TEE_STACK": "scone"})


def test_an_unknown_iexec_variable_is_named_and_a_bad_known_one_refused() -> None:
    env = {"IEXEC_GAS_PRICE_CAP": "22000000000", "IEXEC_ASK_REPLICATE_PERIOD": "30000"}
    notes = dict(without_effect(Settings.from_env(env), env))
    assert notes["IEXEC_GAS_PRICE_CAP"] == "not a setting of this pool: ignored"
    with pytest.raises(ValueError, match="IEXEC_ASK_REPLICATE_PERIOD='soon'"):
        Settings.from_env({"IEXEC_ASK_REPLICATE_PERIOD": "soon"})
    with pytest.raises(ValueError, match="IEXEC_PUBLIC_CHAIN_ADDRESS='node:8545'"):
        Settings.from_env({"IEXEC_PUBLIC_CHAIN_ADDRESS": "node:8545"})


def test_a_node_takes_from_its_scheduler_only_what_it_lacks() -> None:
    published = {
        "chainUrl": "http://public-node:8545",
        "hub": "0x" + "11" * 20,
        "chainId": 421614,
        "resultBaseUrl": "https://results.example",
    }
    bare, taken = with_public_config(Settings(), published)
    assert bare.chain_rpc_url == "http://public-node:8545" and bare.chain_id == 421614
    assert bare.hub_address == "0x" + "11" * 20 and bare.public_url == "https://results.example"
    assert len(taken) == 4
    own = Settings(chain_rpc_url="http://own:8545", hub_address="0x" + "22" * 20, chain_id=5)
    kept, taken = with_public_config(own, published)
    assert (kept.chain_rpc_url, kept.hub_address, kept.chain_id) == (
        "http://own:8545",
        "0x" + "22" * 20,
        5,
    )
    assert taken == ["result base https://results.example"]
    # a node's own IEXEC_PUBLIC_CHAIN_ADDRESS comes before the scheduler's
    mine, _ = with_public_config(Settings(public_chain_url="http://mine:8545"), published)
    assert mine.chain_rpc_url == "http://mine:8545"
    # what Redis holds is not trusted blindly
    with pytest.raises(ValueError, match="bad chainUrl 'public-node'"):
        with_public_config(Settings(), {"chainUrl": "public-node"})
    with pytest.raises(ValueError, match="bad hub"):
        with_public_config(Settings(), {"hub": "0x1234"})


# ---- on the devnet ------------------------------------------------------------------------------
@pytest.mark.devnet
def test_the_seed_environment_block_starts_the_scheduler(
    devnet: DevnetHandle, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    proc = start(
        ["scheduler", "--no-beat", "--concurrency", "1"],
        seed_on_devnet(devnet, tmp_path, redis_url),
    )
    try:
        out = Output(proc).until(" ready.", timeout=90)  # the Celery consumer is up
    finally:
        stop(proc)
    assert f"scheduler for pool {devnet.info['workerpool']}" in out
    assert f"wallet {devnet.address('scheduler')}" in out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == len(WITHOUT_EFFECT), notes  # each named once, nothing else
    for name, reason in WITHOUT_EFFECT.items():
        assert any(n.startswith(f"note: {name}: no effect") and reason in n for n in notes), name
    config = json.loads(redis_client.get(keys.PUBLIC_CONFIG))
    assert config == {
        "chainUrl": PUBLIC_NODE,
        "hub": devnet.info["hub"],
        "pool": devnet.info["workerpool"],
        "chainId": devnet.client.chain_id,
    }


@pytest.mark.devnet
@pytest.mark.docker
def test_a_node_without_a_chain_url_uses_the_one_its_scheduler_publishes(
    devnet: DevnetHandle, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    node_env = {
        "WORKERPOOL_DEVNET": "1",
        "WORKERPOOL_REDIS_URL": redis_url,
        "IEXEC_WORKER_WALLET_PRIVATE_KEY": devnet.worker_key(9),
        "IEXEC_WORKER_BASE_DIR": str(tmp_path / "node"),
        "WORKERPOOL_HEARTBEAT_PERIOD": "1",
    }
    # no scheduler has published anything yet: the node says what to set
    refused = subprocess.run(
        [sys.executable, "-m", "cli", "worker"],
        env={**base_env(), **node_env, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused.stderr
    assert "set IEXEC_PUBLIC_CHAIN_ADDRESS on the scheduler" in refused.stderr

    # the scheduler publishes the devnet node (under another name than its own) for nodes
    public = devnet.info["rpc_url"].replace("127.0.0.1", "localhost")
    settings = Settings.from_env(
        {
            **seed_on_devnet(devnet, tmp_path, redis_url),
            "IEXEC_PUBLIC_CHAIN_ADDRESS": public,
        }
    )
    build(settings, Messenger(make_celery(settings)))
    node = start(["worker", "--loglevel", "INFO"], node_env)
    address = devnet.client.w3.eth.account.from_key(devnet.worker_key(9)).address
    output = Output(node)
    try:
        out = output.until(f"chain {public} (IEXEC_PUBLIC_CHAIN_ADDRESS)", timeout=60)
        deadline = time.monotonic() + 60
        while redis_client.get(keys.node_seen(address)) is None:  # it runs: heartbeats
            assert time.monotonic() < deadline, output.text
            time.sleep(0.2)
    finally:
        stop(node)
    assert f"hub {devnet.info['hub']}" in out

    # a published chain id the node's chain does not have: refused before it takes any job
    published = json.loads(redis_client.get(keys.PUBLIC_CONFIG))
    assert published["chainUrl"] == public
    redis_client.set(keys.PUBLIC_CONFIG, json.dumps({**published, "chainId": 1}))
    wrong = subprocess.run(
        [sys.executable, "-m", "cli", "worker"],
        env={
            **base_env(),
            **node_env,
            "IEXEC_HUB_ADDRESS": devnet.info["hub"],
            "PYTHONPATH": str(ROOT),
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 1, wrong.stderr
    assert "from the scheduler: " in wrong.stderr and ", chain id 1\n" in wrong.stderr
    assert f"reports chain {devnet.client.chain_id}" in wrong.stderr
