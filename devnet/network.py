"""A local devnet: anvil on 127.0.0.1 with the real PoCo v6.1.0, a workerpool and sample apps.

By default it mirrors Arbitrum: PoCo in token mode with Arbitrum's facets and an RLC ERC-20 of
its own, stakes deposited through the token; ``mode="native"`` deploys the native-mode PoCo
(stakes in the chain's coin) instead.

``up`` is idempotent: it installs the pinned tools when missing (npm
``@foundry-rs/anvil-linux-amd64`` and a ``npm pack`` of ``@iexec/poco``, cached under
``$XDG_CACHE_HOME/workerpool``), starts anvil with its state kept in the devnet directory (so
``up`` after ``down`` resumes the same chain), deploys PoCo when the chain has none, creates the
workerpool and the sample apps when missing, funds the actors, and writes ``devnet.json``. A
chain of the other mode cannot be converted (PoCo sets its token once): ``up`` in another mode
than the directory's chain starts a new chain, and keeps the old one's files beside it.

All keys here derive from anvil's default mnemonic: they are PUBLIC TEST KEYS, known to
everyone, never to be used on a real chain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from eth_account import Account
from web3 import Web3

from devnet.deploy import MODES, ZERO, Artifacts, Deployer
from poco import POCO_VERSION, actions
from poco.chain import ChainClient, Wallet

log = logging.getLogger(__name__)

ANVIL_PACKAGE = "@foundry-rs/anvil-linux-amd64"
ANVIL_VERSION = "1.7.1"
POCO_PACKAGE = "@iexec/poco"

# PUBLIC TEST MNEMONIC (anvil/hardhat default). Every key derived from it is public.
PUBLIC_TEST_MNEMONIC = "test test test test test test test test test test test junk"
ANVIL_ACCOUNTS = 20
ROLES = ("deployer", "scheduler", "requester", "app_provider")
FIRST_WORKER_INDEX = len(ROLES)
WORKER_COUNT = ANVIL_ACCOUNTS - FIRST_WORKER_INDEX

# Sample apps: name -> local Docker image built by ops/apps/build.
SAMPLE_APPS = {
    "echo": "workerpool-apps/echo:1",
    "crash": "workerpool-apps/crash:1",
    "bigout": "workerpool-apps/bigout:1",
    "sleep": "workerpool-apps/sleep:1",
    "nocomputed": "workerpool-apps/nocomputed:1",
    "evil": "workerpool-apps/evil:1",
    "callback": "workerpool-apps/callback:1",
    "failwrite": "workerpool-apps/failwrite:1",
    "deeptree": "workerpool-apps/deeptree:1",
    "spin": "workerpool-apps/spin:1",
    "fsprobe": "workerpool-apps/fsprobe:1",
}
WORKERPOOL_DESCRIPTION = "workerpool devnet pool"

# Deposits in nRLC (native mode: 1 nRLC = 1e9 wei; anvil gives each account 10,000 ETH).
DEPOSITS = {"scheduler": 1_000 * 10**9, "requester": 5_000 * 10**9, "worker": 100 * 10**9}
# Token mode: RLC left in each wallet beside its deposit (the deployer holds the 87M RLC the
# token mints and hands these out), so that `workerpool account deposit` has some to move.
WALLET_RLC = {
    "scheduler": 1_000 * 10**9,
    "requester": 5_000 * 10**9,
    "app_provider": 100 * 10**9,
    "worker": 100 * 10**9,
}

DEVNET_KEYS = (
    "rpc_url",
    "chain_id",
    "mode",
    "rlc",
    "hub",
    "app_registry",
    "dataset_registry",
    "workerpool_registry",
    "workerpool",
    "apps",
    "accounts",
)


class DevnetError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("WORKERPOOL_TOOLS_DIR") or Path(base) / "workerpool")


def derive_key(index: int, mnemonic: str = PUBLIC_TEST_MNEMONIC) -> str:
    Account.enable_unaudited_hdwallet_features()
    acct = Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{index}")
    return "0x" + bytes(acct.key).hex()


def account_entry(index: int) -> dict[str, str]:
    key = derive_key(index)
    return {"address": Account.from_key(key).address, "private_key": key}


# ---- tools --------------------------------------------------------------------------------
def _npm(args: list[str], cwd: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DevnetError("npm is not installed (apt-get install nodejs npm)")
    proc = subprocess.run(
        [npm, *args, "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise DevnetError(f"npm {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")


def ensure_tools() -> tuple[Path, Path]:
    """Install (once) the pinned anvil binary and unpack @iexec/poco; return their paths."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    package_json = root / "package.json"
    if not package_json.exists():  # npm walks up to a parent's package.json otherwise
        package_json.write_text(json.dumps({"name": "workerpool-tools", "private": True}))
    anvil = root / "node_modules" / ANVIL_PACKAGE / "bin" / "anvil"
    if not anvil.exists():
        log.info("installing %s@%s", ANVIL_PACKAGE, ANVIL_VERSION)
        _npm(["install", f"{ANVIL_PACKAGE}@{ANVIL_VERSION}"], root)
    poco_dir = root / f"poco-{POCO_VERSION}"
    if not (poco_dir / "package" / "artifacts").is_dir():
        log.info("fetching %s@%s", POCO_PACKAGE, POCO_VERSION)
        _npm(["pack", f"{POCO_PACKAGE}@{POCO_VERSION}"], root)
        tgz = root / f"iexec-poco-{POCO_VERSION}.tgz"
        tmp = root / f"poco-{POCO_VERSION}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(poco_dir, ignore_errors=True)
        tmp.rename(poco_dir)
        tgz.unlink()
    return anvil, poco_dir / "package"


# ---- the anvil process ----------------------------------------------------------------------
@dataclass
class Devnet:
    """Paths and process control of one devnet directory."""

    directory: Path
    port: int = 8545

    @property
    def json_path(self) -> Path:
        return self.directory / "devnet.json"

    @property
    def pid_path(self) -> Path:
        return self.directory / "anvil.pid"

    @property
    def state_path(self) -> Path:
        return self.directory / "anvil-state.json"

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def load(self) -> dict[str, Any] | None:
        if not self.json_path.exists():
            return None
        return cast(dict[str, Any], json.loads(self.json_path.read_text()))

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"anvil" not in cmdline.read_bytes():
            return None  # pid reused by another program
        return pid

    def answers(self, url: str | None = None) -> bool:
        try:
            w3 = Web3(Web3.HTTPProvider(url or self.rpc_url, request_kwargs={"timeout": 2}))
            return bool(w3.is_connected())
        except Exception:
            return False

    def start_anvil(self, anvil: Path, prune_history: bool = False) -> None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                raise DevnetError(
                    f"port {self.port} on 127.0.0.1 is taken by another program; "
                    "stop it or choose --port"
                )
        args = [
            str(anvil),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--accounts",
            str(ANVIL_ACCOUNTS),
            "--mnemonic",
            PUBLIC_TEST_MNEMONIC,
            "--dump-state",
            str(self.state_path),
            "--state-interval",
            "5",
        ]
        if prune_history:
            # no per-block state kept: ~10x faster mining, but a call racing a new block
            # may find its state gone; only for chains that mostly mine empty blocks
            args.append("--prune-history")
        if self.state_path.exists() and self.state_path.stat().st_size > 0:
            args += ["--load-state", str(self.state_path)]
        logfile = open(self.directory / "anvil.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            args,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI that started it
        )
        logfile.close()
        self.pid_path.write_text(str(proc.pid))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DevnetError(
                    f"anvil exited with code {proc.returncode}; see {self.directory / 'anvil.log'}"
                )
            if self.answers():
                return
            time.sleep(0.05)
        raise DevnetError("anvil did not answer within 20 s")

    def stop(self) -> bool:
        """Stop the anvil this directory started (by pid); True when one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pid_path.unlink(missing_ok=True)
        return True


# ---- provisioning -------------------------------------------------------------------------
def _has_code(client: ChainClient, address: str) -> bool:
    return len(client.rpc("get_code", lambda: client.eth.get_code(address))) > 0


def _ensure_workerpool(scheduler: Wallet) -> str:
    return actions.create_workerpool(scheduler, WORKERPOOL_DESCRIPTION)[0]


def _ensure_app(
    client: ChainClient, registry_address: str, owner: Wallet, name: str, image: str
) -> str:
    registry = client.contract("AppRegistry", registry_address)
    args = (owner.address, name, "DOCKER", image.encode(), b"\x00" * 32, b"")
    predicted = registry.functions.predictApp(*args).call()
    if not _has_code(client, predicted):
        owner.transact(registry.functions.createApp(*args))
    return str(predicted)


def _fund(deployer: Wallet, wallet: Wallet, deposit_nrlc: int, wallet_nrlc: int) -> None:
    """Top ``wallet`` up (idempotent): its PoCo stake to ``deposit_nrlc`` when below half of
    it, and in token mode its wallet RLC to ``wallet_nrlc`` beside it (RLC sent by the
    deployer, deposited by the wallet itself through the token)."""
    client = wallet.client
    have = client.view_account(wallet.address).stake
    missing = deposit_nrlc - have if have < deposit_nrlc // 2 else 0
    if client.mode == "token":
        in_wallet = client.rlc_balance(wallet.address)
        if in_wallet < (missing + wallet_nrlc) // 2 or in_wallet < missing:
            deployer.transact(
                client.rlc().functions.transfer(wallet.address, missing + wallet_nrlc - in_wallet)
            )
    if missing > 0:
        actions.deposit(wallet, missing)


def _archive(devnet: Devnet, mode: str) -> None:
    """Put a chain of another mode aside: stop its anvil, keep its files under new names."""
    devnet.stop()
    for path in (devnet.state_path, devnet.json_path):
        if path.exists():
            path.rename(path.with_name(f"{path.stem}.{mode}{path.suffix}"))
    log.warning(
        "%s held a %s-mode devnet: a new chain is deployed (PoCo sets its token once); "
        "the old one's files are kept as anvil-state.%s.json and devnet.%s.json",
        devnet.directory,
        mode,
        mode,
        mode,
    )


def up(
    directory: Path, port: int = 8545, mode: str = "token"
) -> tuple[dict[str, Any], float, bool]:
    """Bring the devnet up; returns (devnet.json content, seconds taken, whether it deployed).
    ``mode``: ``token`` (Arbitrum's PoCo, the default) or ``native``."""
    if mode not in MODES:
        raise DevnetError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    devnet = Devnet(directory, port)
    anvil, poco_package = ensure_tools()
    existing = devnet.load()
    if existing is not None and existing.get("mode", "native") != mode:
        _archive(devnet, existing.get("mode", "native"))
        existing = None
    if existing is not None:
        devnet.port = int(existing["rpc_url"].rsplit(":", 1)[1])
    if devnet.pid() is None:
        devnet.start_anvil(anvil)
    elif not devnet.answers():
        raise DevnetError(
            f"anvil (pid {devnet.pid()}) runs but does not answer on {devnet.rpc_url}"
        )

    probe = ChainClient(devnet.rpc_url, ZERO)
    deployer = probe.wallet(derive_key(0))
    deployed = False
    if existing is None or not _has_code(probe, existing["hub"]):
        result = Deployer(deployer, Artifacts(poco_package), mode).deploy()
        hub, registries = (
            result.hub,
            {
                "app_registry": result.app_registry,
                "dataset_registry": result.dataset_registry,
                "workerpool_registry": result.workerpool_registry,
            },
        )
        deployed = True
        log.info(
            "deployed PoCo (%s mode, %d facets, %d selectors): %d transactions, %d gas",
            result.mode,
            result.facets,
            result.selectors,
            result.transactions,
            result.gas_used,
        )
    else:
        hub = existing["hub"]
        registries = {
            k: existing[k] for k in ("app_registry", "dataset_registry", "workerpool_registry")
        }

    client = ChainClient(devnet.rpc_url, hub)
    if client.mode != mode:  # a devnet.json that says otherwise than the chain
        raise DevnetError(
            f"the hub {hub} on {devnet.rpc_url} runs in {client.mode} mode, not {mode}; "
            f"remove {directory} to start a new chain"
        )
    deployer = client.wallet(derive_key(0))
    accounts: dict[str, Any] = {role: account_entry(i) for i, role in enumerate(ROLES)}
    accounts["workers"] = [account_entry(FIRST_WORKER_INDEX + i) for i in range(WORKER_COUNT)]
    scheduler = client.wallet(accounts["scheduler"]["private_key"])
    app_provider = client.wallet(accounts["app_provider"]["private_key"])
    workerpool = _ensure_workerpool(scheduler)
    apps = {
        name: {
            "address": _ensure_app(client, registries["app_registry"], app_provider, name, image),
            "image": image,
        }
        for name, image in SAMPLE_APPS.items()
    }
    _fund(deployer, scheduler, DEPOSITS["scheduler"], WALLET_RLC["scheduler"])
    requester = client.wallet(accounts["requester"]["private_key"])
    _fund(deployer, requester, DEPOSITS["requester"], WALLET_RLC["requester"])
    _fund(deployer, app_provider, 0, WALLET_RLC["app_provider"])
    for worker in accounts["workers"]:
        _fund(
            deployer, client.wallet(worker["private_key"]), DEPOSITS["worker"], WALLET_RLC["worker"]
        )

    info: dict[str, Any] = {
        "rpc_url": devnet.rpc_url,
        "chain_id": client.chain_id,
        "mode": client.mode,
        "rlc": client.token_address(),
        "hub": hub,
        **registries,
        "workerpool": workerpool,
        "apps": apps,
        "accounts": accounts,
    }
    assert tuple(info) == DEVNET_KEYS
    devnet.json_path.write_text(json.dumps(info, indent=2) + "\n")
    (directory / "README.txt").write_text(
        "This directory holds a local devnet made by `workerpool devnet up`.\n"
        "The private keys in devnet.json are PUBLIC TEST KEYS derived from anvil's default\n"
        "mnemonic; everyone knows them. Never use them on a real chain.\n"
    )
    return info, time.monotonic() - started, deployed


def status(directory: Path) -> dict[str, Any]:
    devnet = Devnet(directory)
    info = devnet.load()
    out: dict[str, Any] = {
        "directory": str(directory),
        "pid": devnet.pid(),
        "configured": info is not None,
    }
    if info is not None:
        out["rpc_url"] = info["rpc_url"]
        out["answers"] = devnet.answers(info["rpc_url"])
        if out["answers"]:
            client = ChainClient(info["rpc_url"], info["hub"])
            out["block"] = client.block_number()
            out["poco_deployed"] = _has_code(client, info["hub"])
            out["mode"] = info.get("mode", "native")
    return out


def env_lines(info: dict[str, Any], worker: int | None = None, mnemonic: bool = False) -> list[str]:
    """``export`` lines pointing every service at the devnet (keys are public test keys)."""
    lines = [
        "# devnet settings; the keys below are PUBLIC TEST KEYS (anvil's default mnemonic)",
        f"export IEXEC_PRIVATE_CHAIN_ADDRESS={info['rpc_url']}",
        f"export IEXEC_CHAIN_ID={info['chain_id']}",
        f"export IEXEC_HUB_ADDRESS={info['hub']}",
        f"export POOL_ADDRESS={info['workerpool']}",
        "export IEXEC_START_BLOCK_NUMBER=0",
        "export WORKERPOOL_DEVNET=1",
        f"export IEXEC_CORE_WALLET_PRIVATE_KEY={info['accounts']['scheduler']['private_key']}",
    ]
    if worker is not None:
        workers = info["accounts"]["workers"]
        if not 0 <= worker < len(workers):
            raise DevnetError(f"worker {worker} does not exist; the devnet has {len(workers)}")
        lines.append(f"export IEXEC_WORKER_WALLET_PRIVATE_KEY={workers[worker]['private_key']}")
    if worker is not None or mnemonic:
        # a devnet's input files are served from this host: let the worker fetch them
        lines.append("export WORKERPOOL_DOWNLOAD_ALLOW_PRIVATE=1")
    if mnemonic:
        lines += [
            f"export IEXEC_WORKER_MNEMONIC='{PUBLIC_TEST_MNEMONIC}'",
            f"export WORKERPOOL_WORKER_INDEX_FIRST={FIRST_WORKER_INDEX}",
            f"export WORKERPOOL_WORKER_INDEX_COUNT={WORKER_COUNT}",
        ]
    return lines


# ---- the TEE stand-ins (SIMULATION) -----------------------------------------------------------
TEE_FRAMEWORKS = ("tdx",)
TEE_PORT = 13300
TEE_JSON = "tee.json"
TEE_PID = "tee.pid"


def _image_present(tag: str) -> bool:
    proc = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False)
    return proc.returncode == 0


def ensure_stage_images() -> list[str]:
    """The simulated stage images, built by ``ops/apps/build`` when missing (a checkout of the
    project has it; otherwise the error says how to build them)."""
    from devnet.tee import POST_COMPUTE_IMAGE, PRE_COMPUTE_IMAGE

    images = [PRE_COMPUTE_IMAGE, POST_COMPUTE_IMAGE]
    try:
        missing = [tag for tag in images if not _image_present(tag)]
    except OSError as exc:
        raise DevnetError(f"docker is not usable here: {exc}") from exc
    if not missing:
        return images
    build = Path(__file__).resolve().parents[1] / "ops" / "apps" / "build"
    if not build.exists():
        raise DevnetError(
            f"the stage images {', '.join(missing)} are missing: build them from a checkout "
            "of the project with ops/apps/build tee-pre-compute tee-post-compute"
        )
    proc = subprocess.run(
        ["bash", str(build), "tee-pre-compute", "tee-post-compute"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise DevnetError(f"ops/apps/build failed: {(proc.stdout + proc.stderr)[-1500:]}")
    return images


def _tee_pid(directory: Path) -> int | None:
    try:
        pid = int((directory / TEE_PID).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"tee-serve" in cmdline else None


def tee_info(directory: Path) -> dict[str, Any] | None:
    """What ``up --tee`` started (tee.json), or None."""
    path = directory / TEE_JSON
    if not path.exists():
        return None
    return cast(dict[str, Any], json.loads(path.read_text()))


def start_tee(
    directory: Path,
    framework: str,
    port: int = TEE_PORT,
    ipfs_api: str = "http://127.0.0.1:5001",
    ipfs_gateway: str = "http://127.0.0.1:8080",
) -> dict[str, Any]:
    """Start the TEE stand-ins of ``framework`` (SIMULATION) beside the devnet of
    ``directory``: the stage images (built if missing) and the SMS and result proxy process
    (``workerpool devnet tee-serve``), which refuses any chain but the devnet's. Idempotent:
    a stand-in already running is kept."""
    if framework not in TEE_FRAMEWORKS:
        raise DevnetError(
            f"unknown TEE framework {framework!r}; known: {', '.join(TEE_FRAMEWORKS)}"
        )
    if Devnet(directory).load() is None:
        raise DevnetError(f"no devnet in {directory} (run: workerpool devnet up)")
    images = ensure_stage_images()
    known = tee_info(directory)
    if known is not None and _tee_pid(directory) is not None and _answers(known["sms_url"]):
        return known
    url = f"http://127.0.0.1:{port}"
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise DevnetError(f"port {port} on 127.0.0.1 is taken; choose --tee-port")
    logfile = open(directory / "tee.log", "ab")  # noqa: SIM115 - handed to the child
    command = [sys.executable, "-m", "cli", "devnet", "tee-serve", "--dir", str(directory)]
    command += ["--port", str(port), "--ipfs-api", ipfs_api, "--ipfs-gateway", ipfs_gateway]
    proc = subprocess.Popen(
        command,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    logfile.close()
    (directory / TEE_PID).write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while not _answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            tail = (directory / "tee.log").read_text(errors="replace")[-1500:]
            raise DevnetError(f"the TEE stand-ins did not start:\n{tail}")
        time.sleep(0.1)
    info = {
        "framework": framework,
        "simulation": True,
        "sms_url": url,
        "result_proxy_url": url,
        "pre_compute_image": images[0],
        "post_compute_image": images[1],
        "ipfs_api": ipfs_api,
        "ipfs_gateway": ipfs_gateway,
    }
    (directory / TEE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _answers(url: str) -> bool:
    try:
        import requests

        return requests.get(f"{url}/simulation", timeout=2).status_code == 200
    except Exception:
        return False


def stop_tee(directory: Path) -> bool:
    """Stop the stand-ins ``up --tee`` started (by pid); True when they were running."""
    pid = _tee_pid(directory)
    (directory / TEE_PID).unlink(missing_ok=True)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return True


def tee_env_lines(tee: dict[str, Any]) -> list[str]:
    """What a scheduler and a node need to use the stand-ins (SIMULATION)."""
    return [
        "# TDX SIMULATION: the devnet's stand-ins, no enclave and no attestation",
        "export WORKERPOOL_TEE_STACK=tdx",
        f"export WORKERPOOL_SMS_TDX_URL={tee['sms_url']}",
        f"export WORKERPOOL_RESULT_PROXY_URL={tee['result_proxy_url']}",
        "# a node that runs TDX tasks (simulation: refused on any chain but the devnet's)",
        "export WORKERPOOL_WORKER_TDX=simulation",
        f"export WORKERPOOL_TDX_PRE_COMPUTE_IMAGE={tee['pre_compute_image']}",
        f"export WORKERPOOL_TDX_POST_COMPUTE_IMAGE={tee['post_compute_image']}",
        "export WORKERPOOL_WORKER_API_BIND=127.0.0.1:0",
    ]
