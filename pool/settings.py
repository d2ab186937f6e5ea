"""One typed settings object, read from the environment, shared by every service.

Names follow iexec-core / iexec-worker where one exists (``IEXEC_PRIVATE_CHAIN_ADDRESS``,
``POOL_ADDRESS``, ``MONGO_HOST`` …); our own settings start with ``WORKERPOOL_``. Every setting
is declared once in :data:`SETTINGS` with its default and its meaning; ``docs/settings.md`` is
generated from that table (``workerpool settings --markdown``). A missing or malformed value
stops start-up with a :class:`SettingsError` that names the variable.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from eth_utils import is_address, to_checksum_address

from pool.redact import redact_urls


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the environment variable."""


def _str(value: str) -> str:
    return value


def _int(value: str) -> int:
    return int(value, 0)


def _nonneg_int(value: str) -> int:
    number = int(value, 0)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _pos_int(value: str) -> int:
    number = int(value, 0)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def _pos_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _nonneg_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _fee_factor(value: str) -> float:
    number = float(value)
    if number <= 1.1:
        raise ValueError("must be > 1.1 (nodes refuse a replacement raising fees by less)")
    return number


FAULTS = ("wrong-digest", "crash-before-contribute", "crash-after-contribute")


def _fault(value: str) -> str:
    if value and value not in FAULTS:
        raise ValueError(f"must be empty or one of {', '.join(FAULTS)}")
    return value


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _address(value: str) -> str:
    if not is_address(value):
        raise ValueError("is not an Ethereum address")
    return to_checksum_address(value)


def _int_list(value: str) -> tuple[int, ...]:
    return tuple(int(part, 0) for part in value.split(",") if part.strip())


def _str_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _url(value: str) -> str:
    if "://" not in value:
        raise ValueError("is not a URL (scheme://host:port)")
    return value.rstrip("/")


def _opt_url(value: str) -> str:
    return _url(value) if value.strip() else ""


def _opt_pos_int(value: str) -> int | None:
    return _pos_int(value) if value.strip() else None


def _opt_nonneg_int(value: str) -> int | None:
    return _nonneg_int(value) if value.strip() else None


# TEE frameworks a pool may run (the tag's low nibble names one: tee+scone, tee+gramine, tee+tdx);
# this pool's worker nodes run TDX only (scone and gramine are SGX frameworks, which the iExec
# SDK 9 no longer signs)
TEE_STACKS = ("tdx",)
SGX_FRAMEWORKS = ("scone", "gramine")


def _tee_stack(value: str) -> tuple[str, ...]:
    names = _str_list(value.lower())
    sgx = [name for name in names if name in SGX_FRAMEWORKS]
    if sgx:
        raise ValueError(
            f"{', '.join(sgx)}: this pool's worker nodes run no SGX enclave (TDX only: "
            "WORKERPOOL_TEE_STACK=tdx)"
        )
    unknown = [name for name in names if name not in TEE_STACKS]
    if unknown:
        raise ValueError(
            f"unknown TEE framework {', '.join(unknown)}; known: {', '.join(TEE_STACKS)}"
        )
    return names


# what a worker node does with TDX tasks: nothing (off), run them in its TDX guest (on), or the
# software simulation of the devnet's stand-ins (simulation: devnet chains only)
WORKER_TDX_MODES = ("off", "on", "simulation")


def _worker_tdx(value: str) -> str:
    mode = value.strip().lower() or "off"
    if mode not in WORKER_TDX_MODES:
        raise ValueError(f"must be one of {', '.join(WORKER_TDX_MODES)}")
    return mode


def _host_port(value: str) -> str:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port (port 0: any free port)")
    return f"{host}:{int(port)}"


# Blocks the listener waits by default, by chain id: deals are read only once that many blocks
# are built on theirs (a reorganisation deeper than the re-read window is not followed).
# Arbitrum's blocks come every ~0.25 s from one sequencer, Ethereum's every 12 s; a local
# devnet has one node and never reorganises.
CONFIRMATIONS_BY_CHAIN: dict[int, int] = {
    42161: 20,  # Arbitrum One
    421614: 20,  # Arbitrum Sepolia
    1: 12,  # Ethereum
    11155111: 12,  # Sepolia
    31337: 0,  # anvil / hardhat devnet
    1337: 0,  # geth --dev, ganache
    65535: 0,  # iExec's local poco-chain
}
DEFAULT_CONFIRMATIONS = 12
CONFIRMATIONS_SHOWN = (
    ("Arbitrum One and Arbitrum Sepolia", 20),
    ("Ethereum and Sepolia", 12),
    ("a local devnet (31337, 1337, 65535)", 0),
)


@dataclass(frozen=True)
class ChainPreset:
    """A network iExec runs on: what ``IEXEC_CHAIN`` fills in (the iExec SDK 9's values)."""

    name: str
    chain_id: int
    hub: str  # the PoCo proxy
    rlc: str  # the RLC ERC-20 its token-mode hub escrows
    description: str


CHAINS: dict[str, ChainPreset] = {
    preset.name: preset
    for preset in (
        ChainPreset(
            "arbitrum-mainnet",
            42161,
            "0x098bFCb1E50ebcA0BaA92C12eA0c3F045A1aD9f0",
            "0xe649e6a1F2afc63ca268C2363691ceCAF75CF47C",
            "Arbitrum One, where iExec runs (PoCo in token mode, stakes in RLC)",
        ),
        ChainPreset(
            "arbitrum-sepolia-testnet",
            421614,
            "0xB2157BF2fAb286b2A4170E3491Ac39770111Da3E",
            "0x9923eD3cbd90CD78b910c475f9A731A6e0b8C963",
            "Arbitrum Sepolia, iExec's testnet (token mode)",
        ),
        ChainPreset(
            "devnet",
            31337,
            # where `workerpool devnet up` deploys on a fresh anvil (token mode, default
            # mnemonic): the same addresses every time (tests/test_settings.py checks them)
            "0x5FC8d32690cc91D4c39d9d3abcBD16989F875707",
            "0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "the local devnet of `workerpool devnet up` (token mode)",
        ),
    )
}


def _chain(value: str) -> str:
    name = value.strip().lower()
    if name and name not in CHAINS:
        raise ValueError(f"unknown chain; known: {', '.join(CHAINS)}")
    return name


@dataclass(frozen=True)
class Spec:
    env: str
    parse: Callable[[str], Any]
    default: str | None
    doc: str
    secret: bool = False
    group: str = "core"


# attribute name -> Spec. ``default=None`` means required where the attribute is used.
SETTINGS: dict[str, Spec] = {
    # ---- chain ------------------------------------------------------------------------------
    "chain": Spec(
        "IEXEC_CHAIN",
        _chain,
        "",
        "The network: "
        + ", ".join(f"`{n}` ({p.chain_id})" for n, p in CHAINS.items())
        + ". It fills IEXEC_CHAIN_ID and IEXEC_HUB_ADDRESS (each set explicitly still wins); "
        "every service stops at start when the node reports another chain.",
    ),
    "chain_rpc_url": Spec(
        "IEXEC_PRIVATE_CHAIN_ADDRESS",
        _url,
        None,
        "JSON-RPC URL of the chain node (iexec-core's name). A worker node without one uses "
        "the IEXEC_PUBLIC_CHAIN_ADDRESS its scheduler publishes.",
    ),
    "public_chain_url": Spec(
        "IEXEC_PUBLIC_CHAIN_ADDRESS",
        _opt_url,
        "",
        "JSON-RPC URL worker nodes use (iexec-core's name): the scheduler publishes it in Redis "
        "with the hub and chain id, and a node that has no IEXEC_PRIVATE_CHAIN_ADDRESS of its "
        "own uses it (after checking the chain id). Empty: every node needs its own.",
    ),
    "hub_address": Spec(
        "IEXEC_HUB_ADDRESS",
        _address,
        None,
        "Address of the PoCo proxy (the iExec hub) on that chain (default: IEXEC_CHAIN's).",
    ),
    "pool_address": Spec(
        "POOL_ADDRESS",
        _address,
        None,
        "Address of the workerpool this scheduler runs; its owner is the scheduler wallet.",
    ),
    "chain_id": Spec(
        "IEXEC_CHAIN_ID",
        _nonneg_int,
        "0",
        "Expected chain id (default: IEXEC_CHAIN's); 0 without IEXEC_CHAIN accepts whatever "
        "the node reports. Every service checks it at start-up.",
    ),
    "start_block": Spec(
        "IEXEC_START_BLOCK_NUMBER",
        _nonneg_int,
        "0",
        "First block the listener reads on its very first run (later runs use the cursor).",
    ),
    "confirmations": Spec(
        "WORKERPOOL_CONFIRMATIONS",
        _opt_nonneg_int,
        "",
        "Blocks to wait before reading a block's deals (head - confirmations). Empty: by chain "
        "id, "
        + ", ".join(f"{n} on {name}" for name, n in CONFIRMATIONS_SHOWN)
        + f", {DEFAULT_CONFIRMATIONS} on any other chain.",
    ),
    "reorg_window": Spec(
        "WORKERPOOL_REORG_WINDOW",
        _nonneg_int,
        "64",
        "Blocks below its cursor the chain listener reads again on every poll, so that a deal "
        "a chain reorganisation moved to another block (or brought in) is seen; deals already "
        "stored are not stored twice.",
    ),
    "log_range": Spec(
        "WORKERPOOL_LOG_RANGE", _pos_int, "2000", "Largest block range of one eth_getLogs query."
    ),
    "rpc_timeout": Spec(
        "WORKERPOOL_RPC_TIMEOUT", _pos_float, "10", "Seconds before one JSON-RPC request times out."
    ),
    "rpc_retries": Spec(
        "WORKERPOOL_RPC_RETRIES",
        _nonneg_int,
        "5",
        "Retries of a JSON-RPC call after a transport error (exponential backoff).",
    ),
    "tx_timeout": Spec(
        "WORKERPOOL_TX_TIMEOUT", _pos_float, "120", "Seconds to wait for a transaction receipt."
    ),
    "tx_replace_after": Spec(
        "WORKERPOOL_TX_REPLACE_AFTER",
        _pos_float,
        "30",
        "Seconds a sent transaction may wait unmined before it is looked at again: a nonce gap "
        "below it is filled, or it is replaced (same nonce) with fees raised by "
        "WORKERPOOL_TX_FEE_BUMP.",
    ),
    "tx_fee_bump": Spec(
        "WORKERPOOL_TX_FEE_BUMP",
        _fee_factor,
        "1.25",
        "Factor applied to both EIP-1559 fees (or the gas price) of each replacement (> 1.1: "
        "nodes refuse smaller raises).",
    ),
    "max_fee_gwei": Spec(
        "WORKERPOOL_MAX_FEE_GWEI",
        _nonneg_float,
        "0",
        "Ceiling of the fee per gas replacements may reach, in gwei; 0 = no ceiling.",
    ),
    "gas_price_budget_gwei": Spec(
        "WORKERPOOL_GAS_PRICE_BUDGET_GWEI",
        _nonneg_float,
        "0",
        "Gas price, in gwei, at which a wallet's coin balance is judged: a wallet that cannot "
        "pay 1,000,000 gas at this price gets no job (worker) and a warning (scheduler, "
        "`account show`), below 10 times that a warning (iexec-worker's rule); 0 uses the "
        "node's current fee per gas.",
    ),
    # ---- scheduler wallet ------------------------------------------------------------------
    "core_wallet_path": Spec(
        "IEXEC_CORE_WALLET_PATH",
        _str,
        "",
        "Encrypted keystore (JSON) of the scheduler = workerpool owner.",
        group="scheduler",
    ),
    "core_wallet_password": Spec(
        "IEXEC_CORE_WALLET_PASSWORD",
        _str,
        "",
        "Password of that keystore (or put it in a file: IEXEC_CORE_WALLET_PASSWORD_FILE).",
        secret=True,
        group="scheduler",
    ),
    "core_wallet_password_file": Spec(
        "IEXEC_CORE_WALLET_PASSWORD_FILE",
        _str,
        "",
        "File holding the keystore password (Docker secrets).",
        group="scheduler",
    ),
    "core_wallet_private_key": Spec(
        "IEXEC_CORE_WALLET_PRIVATE_KEY",
        _str,
        "",
        "Raw private key of the scheduler: DEVNET ONLY, refused unless WORKERPOOL_DEVNET=1.",
        secret=True,
        group="scheduler",
    ),
    "devnet": Spec(
        "WORKERPOOL_DEVNET",
        _bool,
        "false",
        "Allow raw private keys in the environment (local devnet with public test keys).",
    ),
    # ---- scheduler behaviour ------------------------------------------------------------
    "poll_period": Spec(
        "WORKERPOOL_POLL_PERIOD",
        _pos_float,
        "2",
        "Seconds between two full scheduler ticks (listen, initialize, plan, reconcile with "
        "the chain, detectors).",
        group="scheduler",
    ),
    "listen_period": Spec(
        "WORKERPOOL_LISTEN_PERIOD",
        _nonneg_float,
        "0.5",
        "Seconds between two looks for a new block between full ticks: one "
        "eth_getFilterChanges on a block filter where the chain node keeps one, else one "
        "eth_blockNumber; a new block runs listen, initialize and plan at once (0: new deals "
        "wait for the next full tick).",
        group="scheduler",
    ),
    "init_batch_size": Spec(
        "WORKERPOOL_INIT_BATCH_SIZE",
        _pos_int,
        "20",
        "Tasks initialized by one initializeArray transaction.",
        group="scheduler",
    ),
    "categories": Spec(
        "WORKERPOOL_CATEGORIES",
        _int_list,
        "",
        "Categories the pool serves (comma list of ids); empty serves every category.",
        group="scheduler",
    ),
    "tag_bits": Spec(
        "WORKERPOOL_TAG_BITS",
        _str_list,
        "",
        "Tag bits the pool can serve (names: tee, scone, gramine, tdx, gpu). A deal needing "
        "another bit is skipped. Empty: gpu, plus tee and the frameworks of "
        "WORKERPOOL_TEE_STACK.",
        group="scheduler",
    ),
    "sms_host": Spec(
        "IEXEC_SMS_HOST",
        _str,
        "",
        "Secret Management Service of TEE tasks (iexec-core's name): the SMS of TDX tasks when "
        "WORKERPOOL_SMS_TDX_URL is empty.",
        group="scheduler",
    ),
    "sms_tdx_url": Spec(
        "WORKERPOOL_SMS_TDX_URL",
        _opt_url,
        "",
        "Secret Management Service of TDX tasks (iExec's SMS API). Required with tdx in "
        "WORKERPOOL_TEE_STACK (IEXEC_SMS_HOST stands for it when empty): the scheduler checks "
        "it runs TDX before initializing a TDX task and asks it the task's enclave challenge; "
        "TDX nodes ask it their sessions (a node without one takes the scheduler's).",
        group="scheduler",
    ),
    "result_proxy_url": Spec(
        "WORKERPOOL_RESULT_PROXY_URL",
        _opt_url,
        "",
        "Result proxy of TDX tasks (iExec's /v1/results API): the post-compute stage uploads "
        "the encrypted result through it and nodes read the result's IPFS hash from it (a "
        "deal's iexec_result_storage_proxy wins). Required with tdx in WORKERPOOL_TEE_STACK; "
        "the scheduler hands it to the SMS and to its nodes.",
        group="scheduler",
    ),
    "ask_replicate_period": Spec(
        "IEXEC_ASK_REPLICATE_PERIOD",
        _opt_pos_int,
        "",
        "iexec-core's period (ms) between two requests of a worker for work. Accepted and "
        "without effect (named at start): a worker node takes a replicate from its queue as "
        "soon as one is planned, without polling.",
        group="scheduler",
    ),
    "contribute_and_finalize": Spec(
        "WORKERPOOL_CONTRIBUTE_AND_FINALIZE",
        _bool,
        "true",
        "Trust-1 tasks: the worker publishes the result, then contributes, reveals and "
        "finalizes in one transaction (PoCo's contributeAndFinalize) instead of three.",
        group="scheduler",
    ),
    "reveal_timeout_period": Spec(
        "REVEAL_TIMEOUT_PERIOD",
        _pos_int,
        "120000",
        "Milliseconds the scheduler waits for reveals after consensus (iexec-core's unit).",
        group="scheduler",
    ),
    "worker_allowlist": Spec(
        "WORKERPOOL_WORKER_ALLOWLIST",
        _str_list,
        "",
        "Worker addresses allowed to contribute (comma list); empty allows any worker.",
        group="scheduler",
    ),
    "max_replicates": Spec(
        "WORKERPOOL_MAX_REPLICATES",
        _pos_int,
        "8",
        "Most replicates planned for one task, failed ones included (BOINC's max_total_results).",
        group="scheduler",
    ),
    "max_erroneous": Spec(
        "WORKERPOOL_MAX_ERRONEOUS",
        _nonneg_int,
        "3",
        "Most contributions disagreeing with the best result before a task gets no more "
        "replicates (BOINC's max_error_results); it is then claimed at its final deadline.",
        group="scheduler",
    ),
    "message_max_age": Spec(
        "WORKERPOOL_MESSAGE_MAX_AGE",
        _pos_float,
        "60",
        "Seconds a worker's signed authorization request or heartbeat stays valid: older "
        "ones (or ones dated further ahead) are refused, so the clocks of workers and "
        "scheduler must agree within it. Status reports have no such bound (they may wait in "
        "Redis while the scheduler restarts).",
        group="scheduler",
    ),
    "worker_max_slots": Spec(
        "WORKERPOOL_WORKER_MAX_SLOTS",
        _pos_int,
        "64",
        "Most slots a worker's heartbeat may declare; a heartbeat declaring more is refused "
        "(the fleet's capacity sizes the orders the pool publishes).",
        group="scheduler",
    ),
    "worker_lost_timeout": Spec(
        "WORKER_LOST_TIMEOUT",
        _pos_float,
        "30",
        "Seconds without a heartbeat after which a worker is LOST and its in-flight "
        "replicates are planned on others.",
        group="scheduler",
    ),
    "worker_max_failures": Spec(
        "WORKERPOOL_WORKER_MAX_FAILURES",
        _pos_int,
        "3",
        "Consecutive failures on the node's side (Docker engine, image registry, disk) after "
        "which a worker is paused; failures of the app or of the requester's inputs do not "
        "count.",
        group="scheduler",
    ),
    "worker_pause": Spec(
        "WORKERPOOL_WORKER_PAUSE",
        _pos_float,
        "300",
        "Seconds a failing worker is paused (gets no authorization).",
        group="scheduler",
    ),
    "progress_grace": Spec(
        "WORKERPOOL_PROGRESS_GRACE",
        _pos_float,
        "300",
        "Seconds of slack in the progress bound of each replicate status (docs/operations.md): "
        "a replicate of a live worker that stays in one status past its bound is marked "
        "WORKER_LOST, its node told to abort it, and it is planned on another worker.",
        group="scheduler",
    ),
    # ---- worker node ----------------------------------------------------------------------
    "worker_wallet_path": Spec(
        "IEXEC_WORKER_WALLET_PATH",
        _str,
        "",
        "Encrypted keystore of this worker node (iexec-worker's name).",
        group="worker",
    ),
    "worker_wallet_password": Spec(
        "IEXEC_WORKER_WALLET_PASSWORD",
        _str,
        "",
        "Password of the worker keystore.",
        secret=True,
        group="worker",
    ),
    "worker_wallet_password_file": Spec(
        "IEXEC_WORKER_WALLET_PASSWORD_FILE",
        _str,
        "",
        "File holding the worker keystore password.",
        group="worker",
    ),
    "worker_wallet_private_key": Spec(
        "IEXEC_WORKER_WALLET_PRIVATE_KEY",
        _str,
        "",
        "Raw private key of the worker: DEVNET ONLY (needs WORKERPOOL_DEVNET=1).",
        secret=True,
        group="worker",
    ),
    "worker_mnemonic": Spec(
        "IEXEC_WORKER_MNEMONIC",
        _str,
        "",
        "A mnemonic shared by scaled worker nodes: each node leases a free index in Redis and "
        "uses the key at m/44'/60'/0'/0/<index>.",
        secret=True,
        group="worker",
    ),
    "worker_mnemonic_file": Spec(
        "IEXEC_WORKER_MNEMONIC_FILE",
        _str,
        "",
        "File holding that mnemonic (Docker secrets).",
        group="worker",
    ),
    "worker_index_first": Spec(
        "WORKERPOOL_WORKER_INDEX_FIRST",
        _nonneg_int,
        "0",
        "First derivation index a node may lease.",
        group="worker",
    ),
    "worker_index_count": Spec(
        "WORKERPOOL_WORKER_INDEX_COUNT",
        _pos_int,
        "100",
        "How many indexes (from the first) nodes may lease.",
        group="worker",
    ),
    "heartbeat_period": Spec(
        "WORKERPOOL_HEARTBEAT_PERIOD",
        _pos_float,
        "5",
        "Seconds between two heartbeats of a worker node (also renews its index lease).",
        group="worker",
    ),
    "fault_inject": Spec(
        "WORKERPOOL_FAULT_INJECT",
        _fault,
        "",
        "TESTING ONLY: 'wrong-digest' makes this node contribute a wrong result (a liar); "
        "'crash-before-contribute' / 'crash-after-contribute' kill the whole node (SIGKILL) "
        "just before sending its first contribution / just after it is mined.",
        group="worker",
    ),
    "worker_name": Spec(
        "IEXEC_WORKER_NAME",
        _str,
        "",
        "A name for this node in logs and the status API (default: host name).",
        group="worker",
    ),
    "worker_slots": Spec(
        "WORKERPOOL_WORKER_SLOTS",
        _pos_int,
        "2",
        "Replicates this node computes at once (Celery concurrency).",
        group="worker",
    ),
    "worker_dir": Spec(
        "IEXEC_WORKER_BASE_DIR",
        _str,
        "",
        "Where the node keeps task inputs, outputs and results (default: a temp dir).",
        group="worker",
    ),
    "worker_capabilities": Spec(
        "WORKERPOOL_WORKER_CAPABILITIES",
        _str_list,
        "standard",
        "Replicate queues this node serves: standard, gpu (TDX tasks: WORKERPOOL_WORKER_TDX).",
        group="worker",
    ),
    "worker_tdx": Spec(
        "WORKERPOOL_WORKER_TDX",
        _worker_tdx,
        "off",
        "TDX tasks on this node: off; on (the node runs in a TDX guest: /dev/tdx_guest and the "
        "secret provider agent are checked at start, then it serves tee-tdx); simulation (the "
        "devnet's software stand-ins, no enclave and no attestation: refused on any chain but "
        "the devnet's).",
        group="worker",
    ),
    "tdx_pre_compute_image": Spec(
        "WORKERPOOL_TDX_PRE_COMPUTE_IMAGE",
        _str,
        "iexechub/tee-worker-pre-compute-rust:0.4.0",
        "Pre-compute stage image of TDX tasks (inputs, dataset decryption); a session naming "
        "another image is refused.",
        group="worker",
    ),
    "tdx_post_compute_image": Spec(
        "WORKERPOOL_TDX_POST_COMPUTE_IMAGE",
        _str,
        "iexechub/tee-worker-post-compute-rust:0.3.0",
        "Post-compute stage image of TDX tasks (result encryption, upload, enclave "
        "signature); a session naming another image is refused.",
        group="worker",
    ),
    "tdx_secret_provider_agent": Spec(
        "WORKERPOOL_TDX_SECRET_PROVIDER_AGENT",
        _str,
        "/usr/local/bin/secret_provider_agent",
        "The program that attests this TDX guest to the SMS's secret provider and writes the "
        "task's session (iexec-worker's tee.tdx.secret-provider-agent).",
        group="worker",
    ),
    "tdx_stage_network": Spec(
        "WORKERPOOL_TDX_STAGE_NETWORK",
        _str,
        "host",
        "Docker network of the pre- and post-compute stages of TDX tasks (they reach the "
        "node's enclave API, the result proxy and input URLs).",
        group="worker",
    ),
    "worker_api_bind": Spec(
        "WORKERPOOL_WORKER_API_BIND",
        _host_port,
        "127.0.0.1:13100",
        "host:port of the node's enclave API, where the stages of TDX tasks report (exit "
        "causes, the signed computed file); port 0 takes a free port. Only with "
        "WORKERPOOL_WORKER_TDX on or simulation.",
        group="worker",
    ),
    "app_memory_mb": Spec(
        "WORKERPOOL_APP_MEMORY_MB",
        _pos_int,
        "1024",
        "Memory limit of one app container (MB).",
        group="worker",
    ),
    "app_cpus": Spec(
        "WORKERPOOL_APP_CPUS", _pos_float, "1", "CPUs of one app container.", group="worker"
    ),
    "app_output_limit_mb": Spec(
        "WORKERPOOL_APP_OUTPUT_LIMIT_MB",
        _pos_int,
        "100",
        "Largest /iexec_out an app may write (MB); past it the app is stopped.",
        group="worker",
    ),
    "app_input_limit_mb": Spec(
        "WORKERPOOL_APP_INPUT_LIMIT_MB",
        _pos_int,
        "100",
        "Largest input file or dataset a worker downloads (MB).",
        group="worker",
    ),
    "app_input_files_max": Spec(
        "WORKERPOOL_APP_INPUT_FILES_MAX",
        _pos_int,
        "100",
        "Most input files a task may list (iexec_input_files); more is the requester's error.",
        group="worker",
    ),
    "app_input_total_mb": Spec(
        "WORKERPOOL_APP_INPUT_TOTAL_MB",
        _pos_int,
        "500",
        "Largest total of a task's input files and dataset (MB).",
        group="worker",
    ),
    "download_allow_private": Spec(
        "WORKERPOOL_DOWNLOAD_ALLOW_PRIVATE",
        _bool,
        "false",
        "Let input files and datasets be fetched from non-global addresses (loopback, private, "
        "link-local, the cloud metadata address...), redirects included: for devnets and "
        "tests only. Off, such a URL is the requester's error.",
        group="worker",
    ),
    "download_private_hosts": Spec(
        "WORKERPOOL_DOWNLOAD_PRIVATE_HOSTS",
        _str_list,
        "",
        "host:port pairs (comma-separated) that input files and datasets may come from even "
        "though they resolve to non-global addresses (a data server on the pool's own "
        "network); every other non-global address stays refused.",
        group="worker",
    ),
    "app_tmp_mb": Spec(
        "WORKERPOOL_APP_TMP_MB",
        _pos_int,
        "64",
        "Size of the app's /tmp (a tmpfs, counted in its memory); the rest of its root "
        "filesystem is read-only.",
        group="worker",
    ),
    "app_output_tmpfs": Spec(
        "WORKERPOOL_APP_OUTPUT_TMPFS",
        _bool,
        "true",
        "Mount each app's /iexec_out on a tmpfs of WORKERPOOL_APP_OUTPUT_LIMIT_MB, so the "
        "limit is a hard one (needs root with CAP_SYS_ADMIN, in the Docker engine's mount "
        "namespace); when the node cannot mount, it measures the output while the app runs "
        "(a soft limit) and says so at start.",
        group="worker",
    ),
    "app_max_runtime": Spec(
        "WORKERPOOL_APP_MAX_RUNTIME",
        _nonneg_int,
        "0",
        "Cap on an app's wall time in seconds; 0 uses the category's time reference "
        "(workClockTimeRef), as iExec defines the maximum execution time.",
        group="worker",
    ),
    "app_network": Spec(
        "WORKERPOOL_APP_NETWORK",
        _bool,
        "false",
        "Give app containers a network (off: network_mode=none).",
        group="worker",
    ),
    "result_storage": Spec(
        "WORKERPOOL_RESULT_STORAGE",
        _str,
        "ipfs",
        "Where results are published: ipfs (Kubo RPC API) or local (files served by the API: "
        "a devnet convenience, the iExec SDK cannot download such results).",
        group="results",
    ),
    "local_results_dir": Spec(
        "WORKERPOOL_LOCAL_RESULTS_DIR",
        _str,
        "",
        "Folder of the local publisher (shared by workers and the API).",
        group="results",
    ),
    "public_url": Spec(
        "WORKERPOOL_PUBLIC_URL",
        _str,
        "",
        "Base URL under which the API is reachable (scheme://host[:port], no path): local "
        "result links, the task routes' links and the pool-discovery route answer with it.",
        group="results",
    ),
    "result_repository_protocol": Spec(
        "IEXEC_RESULT_REPOSITORY_PROTOCOL",
        _str,
        "http",
        "Scheme of the result repository URL (iexec-core's name).",
        group="results",
    ),
    "result_repository_host": Spec(
        "IEXEC_RESULT_REPOSITORY_HOST",
        _str,
        "",
        "Where results are served from (iexec-core's name; a host, or a URL): with "
        "WORKERPOOL_RESULT_STORAGE=local and no WORKERPOOL_PUBLIC_URL, result links are "
        "<protocol>://<host>:<port>/results/<taskid>.zip, and the scheduler publishes that base "
        "to its nodes. With ipfs storage results are served by IPFS and it has no effect "
        "(named at start).",
        group="results",
    ),
    "result_repository_port": Spec(
        "IEXEC_RESULT_REPOSITORY_PORT",
        _opt_pos_int,
        "",
        "Port of that result repository (empty: the scheme's default, or the one in the URL).",
        group="results",
    ),
    # ---- storage and broker -------------------------------------------------------------
    "mongo_url": Spec(
        "MONGO_URL",
        _str,
        "",
        "Full MongoDB URL; overrides MONGO_HOST/MONGO_PORT. 'mongomock://' is in-memory "
        "(one process only: tests and the demo).",
        group="storage",
    ),
    "mongo_host": Spec("MONGO_HOST", _str, "127.0.0.1", "MongoDB host.", group="storage"),
    "mongo_port": Spec("MONGO_PORT", _pos_int, "27017", "MongoDB port.", group="storage"),
    "mongo_db": Spec("MONGO_DB", _str, "workerpool", "MongoDB database name.", group="storage"),
    "redis_url": Spec(
        "WORKERPOOL_REDIS_URL",
        _url,
        "redis://127.0.0.1:6379/0",
        "Redis URL: the Celery broker and the scheduler's locks; rediss:// for TLS (the "
        "server's certificate is verified). A password may be in it (redis://:PASSWORD@host), "
        "better in WORKERPOOL_REDIS_PASSWORD_FILE. With Redis Sentinel: "
        "'sentinel://:<password>@<host>:26379/0;sentinel://...', one part per Sentinel, and "
        "WORKERPOOL_REDIS_MASTER_NAME.",
        group="storage",
    ),
    "redis_password_file": Spec(
        "WORKERPOOL_REDIS_PASSWORD_FILE",
        _str,
        "",
        "File holding Redis' password (requirepass; Docker secrets), used with "
        "WORKERPOOL_REDIS_URL by every process.",
        group="storage",
    ),
    "redis_ca_file": Spec(
        "WORKERPOOL_REDIS_CA_FILE",
        _str,
        "",
        "CA certificate that signed Redis' TLS certificate (rediss:// URLs); empty: the "
        "system's CAs.",
        group="storage",
    ),
    "redis_master_name": Spec(
        "WORKERPOOL_REDIS_MASTER_NAME",
        _str,
        "",
        "With a sentinel:// WORKERPOOL_REDIS_URL: the name the Sentinels know the primary by "
        "(their 'sentinel monitor <name> ...').",
        group="storage",
    ),
    "redis_sentinel_password": Spec(
        "WORKERPOOL_REDIS_SENTINEL_PASSWORD",
        _str,
        "",
        "The Sentinels' own password (their 'requirepass'), when they require one.",
        secret=True,
        group="storage",
    ),
    # ---- results and API ----------------------------------------------------------------
    "ipfs_host": Spec(
        "IEXEC_IPFS_HOST", _str, "127.0.0.1", "IPFS RPC API host (Kubo).", group="results"
    ),
    "ipfs_port": Spec("IEXEC_IPFS_PORT", _pos_int, "5001", "IPFS RPC API port.", group="results"),
    "core_port": Spec(
        "IEXEC_CORE_PORT",
        _pos_int,
        "18090",
        "Port of the status API (iexec-core's default).",
        group="api",
    ),
    "api_host": Spec(
        "WORKERPOOL_API_HOST", _str, "127.0.0.1", "Address the status API binds to.", group="api"
    ),
    "api_token": Spec(
        "WORKERPOOL_API_TOKEN",
        _str,
        "",
        "Bearer token of the API's mutating routes (Authorization: Bearer <token>); empty "
        "keeps the API read-only.",
        secret=True,
        group="api",
    ),
    "api_max_lag": Spec(
        "WORKERPOOL_API_MAX_LAG",
        _nonneg_int,
        "20",
        "Blocks the chain listener may be behind (head - confirmations) before /healthz fails.",
        group="api",
    ),
    "api_threads": Spec(
        "WORKERPOOL_API_THREADS",
        _pos_int,
        "8",
        "Threads of `workerpool api` (waitress): requests served at once.",
        group="api",
    ),
    "logs_availability_days": Spec(
        "IEXEC_LOGS_AVAILABILITY_PERIOD_IN_DAYS",
        _pos_int,
        "3",
        "Days a task's compute logs are kept for its requester after the task's final "
        "deadline; then they are deleted (iexec-core's default).",
        group="api",
    ),
    # ---- workerpool orders and the orderbook (orders/book.py) -----------------------------
    "order_price": Spec(
        "WORKERPOOL_ORDER_PRICE",
        _nonneg_int,
        "0",
        "Price of one task in nRLC in the pool's workerpool orders (`order init`, replenish).",
        group="orders",
    ),
    "order_volume": Spec(
        "WORKERPOOL_ORDER_VOLUME",
        _pos_int,
        "1",
        "Volume (tasks) of the order `workerpool order init` writes.",
        group="orders",
    ),
    "order_tag": Spec(
        "WORKERPOOL_ORDER_TAG",
        _str,
        "standard",
        "Tag of the pool's orders: standard, gpu, or a TEE tag of WORKERPOOL_TEE_STACK "
        "(tee,scone / tee,gramine / tee,tdx); names or a bytes32.",
        group="orders",
    ),
    "tee_stack": Spec(
        "WORKERPOOL_TEE_STACK",
        _tee_stack,
        "",
        "TEE frameworks the pool runs: empty, or tdx (it then needs WORKERPOOL_SMS_TDX_URL and "
        "WORKERPOOL_RESULT_PROXY_URL). Orders tagged tee,tdx are signed, published and "
        "replenished, and TDX deals accepted and queued for TDX nodes (tee-tdx), only with tdx "
        "listed here.",
        group="orders",
    ),
    "order_category": Spec(
        "WORKERPOOL_ORDER_CATEGORY",
        _nonneg_int,
        "0",
        "Category of the pool's orders (must exist on chain; 0 is XS on the devnet).",
        group="orders",
    ),
    "order_trust": Spec(
        "WORKERPOOL_ORDER_TRUST",
        _nonneg_int,
        "0",
        "Trust of the pool's orders (TEE orders need 1).",
        group="orders",
    ),
    "order_apprestrict": Spec(
        "WORKERPOOL_ORDER_APPRESTRICT",
        _address,
        "0x0000000000000000000000000000000000000000",
        "Only this app may use the pool's orders (the zero address: any app).",
        group="orders",
    ),
    "order_datasetrestrict": Spec(
        "WORKERPOOL_ORDER_DATASETRESTRICT",
        _address,
        "0x0000000000000000000000000000000000000000",
        "Only this dataset may use the pool's orders (the zero address: any dataset).",
        group="orders",
    ),
    "order_requesterrestrict": Spec(
        "WORKERPOOL_ORDER_REQUESTERRESTRICT",
        _address,
        "0x0000000000000000000000000000000000000000",
        "Only this requester may buy the pool's orders (the zero address: anyone).",
        group="orders",
    ),
    "orderbook_url": Spec(
        "WORKERPOOL_ORDERBOOK_URL",
        _str,
        "",
        "Orderbook the `order` commands talk to (market API shape); empty: the pool's own API "
        "(WORKERPOOL_PUBLIC_URL, else http://WORKERPOOL_API_HOST:IEXEC_CORE_PORT).",
        group="orders",
    ),
    "orderbook_max_open": Spec(
        "WORKERPOOL_ORDERBOOK_MAX_OPEN",
        _pos_int,
        "50",
        "Most open orders one signer may have published in the pool's orderbook (iExec "
        "market rule).",
        group="orders",
    ),
    "orderbook_challenge_ttl": Spec(
        "WORKERPOOL_ORDERBOOK_CHALLENGE_TTL",
        _pos_int,
        "300",
        "Seconds a login challenge of the orderbook stays valid (it is also good only once).",
        group="orders",
    ),
    "orderbook_sync_interval": Spec(
        "WORKERPOOL_ORDERBOOK_SYNC_INTERVAL",
        _pos_float,
        "5",
        "Seconds between two syncs of order statuses with the chain (run by the orderbook's "
        "reads and by the replenish policy).",
        group="orders",
    ),
    "replenish_orders": Spec(
        "WORKERPOOL_REPLENISH_ORDERS",
        _nonneg_int,
        "0",
        "Orders the scheduler keeps published at WORKERPOOL_ORDER_PRICE, their volume matched "
        "to the fleet's free capacity; 0 turns the replenish policy off.",
        group="orders",
    ),
    "replenish_cancel": Spec(
        "WORKERPOOL_REPLENISH_CANCEL",
        _bool,
        "false",
        "When the fleet has no capacity left for a replenished order, also close it on chain "
        "(a transaction) instead of only unpublishing it.",
        group="orders",
    ),
}


@dataclass(frozen=True)
class Settings:
    """Typed settings; build with :meth:`from_env` (or keyword arguments in tests)."""

    chain: str = ""
    chain_rpc_url: str | None = None
    public_chain_url: str = ""
    hub_address: str | None = None
    pool_address: str | None = None
    chain_id: int = 0
    start_block: int = 0
    confirmations: int | None = None
    reorg_window: int = 64
    log_range: int = 2000
    rpc_timeout: float = 10.0
    rpc_retries: int = 5
    tx_timeout: float = 120.0
    tx_replace_after: float = 30.0
    tx_fee_bump: float = 1.25
    max_fee_gwei: float = 0.0
    gas_price_budget_gwei: float = 0.0
    core_wallet_path: str = ""
    core_wallet_password: str = field(default="", repr=False)
    core_wallet_password_file: str = ""
    core_wallet_private_key: str = field(default="", repr=False)
    devnet: bool = False
    poll_period: float = 2.0
    listen_period: float = 0.5
    init_batch_size: int = 20
    categories: tuple[int, ...] = ()
    tag_bits: tuple[str, ...] = ()
    tee_stack: tuple[str, ...] = ()
    sms_host: str = ""
    sms_tdx_url: str = ""
    result_proxy_url: str = ""
    ask_replicate_period: int | None = None
    contribute_and_finalize: bool = True
    reveal_timeout_period: int = 120_000
    worker_allowlist: tuple[str, ...] = ()
    max_replicates: int = 8
    max_erroneous: int = 3
    message_max_age: float = 60.0
    worker_max_slots: int = 64
    worker_lost_timeout: float = 30.0
    worker_max_failures: int = 3
    worker_pause: float = 300.0
    progress_grace: float = 300.0
    worker_mnemonic: str = field(default="", repr=False)
    worker_mnemonic_file: str = ""
    worker_index_first: int = 0
    worker_index_count: int = 100
    heartbeat_period: float = 5.0
    fault_inject: str = ""
    worker_wallet_path: str = ""
    worker_wallet_password: str = field(default="", repr=False)
    worker_wallet_password_file: str = ""
    worker_wallet_private_key: str = field(default="", repr=False)
    worker_name: str = ""
    worker_slots: int = 2
    worker_dir: str = ""
    worker_capabilities: tuple[str, ...] = ("standard",)
    worker_tdx: str = "off"
    tdx_pre_compute_image: str = "iexechub/tee-worker-pre-compute-rust:0.4.0"
    tdx_post_compute_image: str = "iexechub/tee-worker-post-compute-rust:0.3.0"
    tdx_secret_provider_agent: str = "/usr/local/bin/secret_provider_agent"
    tdx_stage_network: str = "host"
    worker_api_bind: str = "127.0.0.1:13100"
    app_memory_mb: int = 1024
    app_cpus: float = 1.0
    app_output_limit_mb: int = 100
    app_input_limit_mb: int = 100
    app_input_files_max: int = 100
    app_input_total_mb: int = 500
    download_allow_private: bool = False
    download_private_hosts: tuple[str, ...] = ()
    app_tmp_mb: int = 64
    app_output_tmpfs: bool = True
    app_max_runtime: int = 0
    app_network: bool = False
    result_storage: str = "ipfs"
    local_results_dir: str = ""
    public_url: str = ""
    result_repository_protocol: str = "http"
    result_repository_host: str = ""
    result_repository_port: int | None = None
    logs_availability_days: int = 3
    mongo_url: str = ""
    mongo_host: str = "127.0.0.1"
    mongo_port: int = 27017
    mongo_db: str = "workerpool"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password_file: str = ""
    redis_ca_file: str = ""
    redis_master_name: str = ""
    redis_sentinel_password: str = field(default="", repr=False)
    ipfs_host: str = "127.0.0.1"
    ipfs_port: int = 5001
    core_port: int = 18090
    api_host: str = "127.0.0.1"
    api_token: str = field(default="", repr=False)
    api_max_lag: int = 20
    api_threads: int = 8
    order_price: int = 0
    order_volume: int = 1
    order_tag: str = "standard"
    order_category: int = 0
    order_trust: int = 0
    order_apprestrict: str = "0x0000000000000000000000000000000000000000"
    order_datasetrestrict: str = "0x0000000000000000000000000000000000000000"
    order_requesterrestrict: str = "0x0000000000000000000000000000000000000000"
    orderbook_url: str = ""
    orderbook_max_open: int = 50
    orderbook_challenge_ttl: int = 300
    orderbook_sync_interval: float = 5.0
    replenish_orders: int = 0
    replenish_cancel: bool = False

    def __post_init__(self) -> None:
        preset = CHAINS.get(self.chain) if self.chain else None
        if self.chain and preset is None:
            raise SettingsError(
                f"IEXEC_CHAIN={self.chain!r}: unknown chain; known: {', '.join(CHAINS)}"
            )
        if preset is not None:  # explicit values win
            if not self.chain_id:
                object.__setattr__(self, "chain_id", preset.chain_id)
            if not self.hub_address:
                object.__setattr__(self, "hub_address", preset.hub)
        if "tdx" in self.tee_stack:
            missing = []
            if "://" not in self.tdx_sms_url():
                missing.append("WORKERPOOL_SMS_TDX_URL (or IEXEC_SMS_HOST, a URL)")
            if not self.result_proxy_url:
                missing.append("WORKERPOOL_RESULT_PROXY_URL")
            if missing:
                raise SettingsError(
                    f"WORKERPOOL_TEE_STACK=tdx needs {' and '.join(missing)}: TDX tasks get "
                    "their enclave challenge and session from an SMS, and upload their "
                    "encrypted result through a result proxy"
                )

    @property
    def preset(self) -> ChainPreset | None:
        """The network IEXEC_CHAIN names, if any."""
        return CHAINS.get(self.chain) if self.chain else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, spec in SETTINGS.items():
            raw = env.get(spec.env)
            if raw is None or raw == "":
                if spec.default is None:
                    continue  # required only where used: see require()
                raw = spec.default
            try:
                values[name] = spec.parse(raw)
            except ValueError as exc:
                shown = "<hidden>" if spec.secret else repr(raw)
                raise SettingsError(f"{spec.env}={shown}: {exc}") from exc
        return cls(**values)

    def require(self, *names: str) -> None:
        """Fail with the variable names of every required setting that is missing."""
        missing = [SETTINGS[n].env for n in names if getattr(self, n) in (None, "")]
        if missing:
            raise SettingsError(f"missing required setting(s): {', '.join(missing)}")

    def mongo_uri(self) -> str:
        return self.mongo_url or f"mongodb://{self.mongo_host}:{self.mongo_port}"

    def confirmations_for(self, chain_id: int) -> int:
        """WORKERPOOL_CONFIRMATIONS, or the default of chain ``chain_id`` when it is empty."""
        if self.confirmations is not None:
            return self.confirmations
        return CONFIRMATIONS_BY_CHAIN.get(chain_id, DEFAULT_CONFIRMATIONS)

    def tdx_sms_url(self) -> str:
        """The SMS of TDX tasks: WORKERPOOL_SMS_TDX_URL, else IEXEC_SMS_HOST (TDX is the one
        TEE framework this pool runs)."""
        return self.sms_tdx_url or self.sms_host

    def node_capabilities(self) -> tuple[str, ...]:
        """The replicate queues this node serves: WORKERPOOL_WORKER_CAPABILITIES, plus
        tee-tdx when WORKERPOOL_WORKER_TDX is on or simulation."""
        if self.worker_tdx == "off" or "tee-tdx" in self.worker_capabilities:
            return self.worker_capabilities
        return (*self.worker_capabilities, "tee-tdx")

    def served_tag_bits(self) -> tuple[str, ...]:
        """Tag bits a deal may need (WORKERPOOL_TAG_BITS, or gpu plus the TEE stack's)."""
        if self.tag_bits:
            return self.tag_bits
        return ("gpu", "tee", *self.tee_stack) if self.tee_stack else ("gpu",)

    def result_base_url(self) -> str:
        """The base of local result links: WORKERPOOL_PUBLIC_URL, else the result repository
        (IEXEC_RESULT_REPOSITORY_*), else the API on this host."""
        if self.public_url:
            return self.public_url.rstrip("/")
        repository = self.result_repository()
        return repository or f"http://{self.api_host}:{self.core_port}"

    def result_repository(self) -> str:
        """``<protocol>://<host>[:<port>]`` from IEXEC_RESULT_REPOSITORY_*; empty without a host."""
        host = self.result_repository_host.strip().rstrip("/")
        if not host:
            return ""
        base = host if "://" in host else f"{self.result_repository_protocol}://{host}"
        authority = base.split("://", 1)[1].split("/", 1)[0]
        if self.result_repository_port is not None and ":" not in authority:
            scheme, rest = base.split("://", 1)
            head, sep, path = rest.partition("/")
            base = f"{scheme}://{head}:{self.result_repository_port}{sep}{path}"
        return base

    def public(self) -> dict[str, Any]:
        """Every setting with secrets masked: safe to log or serve (a URL keeps its scheme,
        host and port only: its userinfo, path and query may hold a password or a key)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            spec = SETTINGS.get(f.name)
            if spec and spec.secret and value:
                value = "***"
            elif isinstance(value, str):
                value = redact_urls(value)
            out[f.name] = value
        return out


def markdown_table() -> str:
    """The settings reference (docs/settings.md is this table)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for spec in SETTINGS.values():
        default = (
            "(required)" if spec.default is None else f"`{spec.default}`" if spec.default else ""
        )
        lines.append(f"| `{spec.env}` | {default} | {spec.doc} |")
    return "\n".join(lines)


# ---- what a scheduler hands its worker nodes (iexec-core's public configuration) ----------------
def public_config(settings: Settings, chain_id: int) -> dict[str, Any]:
    """What the scheduler publishes for its worker nodes (Redis ``keys.PUBLIC_CONFIG``): the
    chain they use (IEXEC_PUBLIC_CHAIN_ADDRESS), the hub and chain id, and where results are
    served from. A node takes each value only when it has none of its own."""
    config: dict[str, Any] = {"chainId": chain_id}
    if settings.hub_address:
        config["hub"] = settings.hub_address
    if settings.pool_address:
        config["pool"] = settings.pool_address
    if settings.public_chain_url:
        config["chainUrl"] = settings.public_chain_url
    base = settings.public_url.rstrip("/") or settings.result_repository()
    if base and settings.result_storage == "local":  # IPFS results have no base URL
        config["resultBaseUrl"] = base
    if "tdx" in settings.tee_stack:  # what TDX nodes need: the SMS, the result proxy
        config["smsTdxUrl"] = settings.tdx_sms_url()
        config["resultProxyUrl"] = settings.result_proxy_url
    return config


def with_public_config(settings: Settings, config: Mapping[str, Any]) -> tuple[Settings, list[str]]:
    """A worker node's settings completed from its scheduler's published configuration: the
    chain URL, hub and pool when the node has none, its chain id when IEXEC_CHAIN_ID is 0, the
    result base when neither WORKERPOOL_PUBLIC_URL nor a result repository is set. Returns
    the settings and what was taken (for the start-up log). A malformed value is refused."""
    taken: list[str] = []
    values: dict[str, Any] = {}

    def parse(key: str, parser: Callable[[str], Any]) -> Any:
        raw = config.get(key)
        try:
            return parser(str(raw))
        except ValueError as exc:
            raise SettingsError(
                f"the scheduler's published configuration has a bad {key} {raw!r}: {exc}"
            ) from exc

    if not settings.chain_rpc_url:
        own = settings.public_chain_url
        if own:
            values["chain_rpc_url"] = own
            taken.append(f"chain {own} (this node's IEXEC_PUBLIC_CHAIN_ADDRESS)")
        elif config.get("chainUrl"):
            values["chain_rpc_url"] = parse("chainUrl", _url)
            taken.append(f"chain {values['chain_rpc_url']} (IEXEC_PUBLIC_CHAIN_ADDRESS)")
    if not settings.hub_address and config.get("hub"):
        values["hub_address"] = parse("hub", _address)
        taken.append(f"hub {values['hub_address']}")
    if not settings.pool_address and config.get("pool"):
        # the node signs its messages in this pool's domain (pool/messages.py)
        values["pool_address"] = parse("pool", _address)
        taken.append(f"pool {values['pool_address']}")
    if not settings.chain_id and config.get("chainId") is not None:
        values["chain_id"] = parse("chainId", _nonneg_int)
        taken.append(f"chain id {values['chain_id']}")
    own_base = settings.public_url or settings.result_repository_host
    if not own_base and config.get("resultBaseUrl"):
        values["public_url"] = parse("resultBaseUrl", _url)
        taken.append(f"result base {values['public_url']}")
    if not settings.tdx_sms_url() and config.get("smsTdxUrl"):
        values["sms_tdx_url"] = parse("smsTdxUrl", _url)
        taken.append(f"TDX SMS {values['sms_tdx_url']}")
    if not settings.result_proxy_url and config.get("resultProxyUrl"):
        values["result_proxy_url"] = parse("resultProxyUrl", _url)
        taken.append(f"result proxy {values['result_proxy_url']}")
    return dataclasses.replace(settings, **values), taken


# ---- settings accepted without effect ---------------------------------------------------------
ASK_REPLICATE_REASON = (
    "no effect: a worker node takes a replicate from its queue as soon as one is planned; "
    "nodes do not poll the scheduler for work"
)


def without_effect(
    settings: Settings, environ: Mapping[str, str], role: str = "scheduler"
) -> list[tuple[str, str]]:
    """The variables set in ``environ`` that do nothing in this pool (or in a ``role``
    process: scheduler or worker), each with the reason, to be named once at start. iexec-core
    names are accepted so that its compose environment runs unchanged."""
    present = {name for name, value in environ.items() if value.strip()}
    notes: list[tuple[str, str]] = []
    if "IEXEC_ASK_REPLICATE_PERIOD" in present:
        notes.append(("IEXEC_ASK_REPLICATE_PERIOD", ASK_REPLICATE_REASON))
    if "IEXEC_SMS_HOST" in present:
        uses_tdx = bool(settings.tee_stack) or (role == "worker" and settings.worker_tdx != "off")
        if not uses_tdx:
            notes.append(
                (
                    "IEXEC_SMS_HOST",
                    "no effect: this pool runs no TEE task (WORKERPOOL_TEE_STACK is empty), and "
                    "only TEE tasks use a Secret Management Service",
                )
            )
        elif settings.sms_tdx_url:
            notes.append(
                ("IEXEC_SMS_HOST", "no effect: WORKERPOOL_SMS_TDX_URL is set, and TDX tasks use it")
            )
    repository = [
        name
        for name in (
            "IEXEC_RESULT_REPOSITORY_HOST",
            "IEXEC_RESULT_REPOSITORY_PORT",
            "IEXEC_RESULT_REPOSITORY_PROTOCOL",
        )
        if name in present
    ]
    if repository and settings.result_storage != "local":
        reason = (
            f"no effect: results are published to IPFS (WORKERPOOL_RESULT_STORAGE="
            f"{settings.result_storage}) and served by IPFS, not from a result repository"
        )
        notes += [(name, reason) for name in repository]
    elif repository and settings.public_url:
        reason = "no effect: WORKERPOOL_PUBLIC_URL is set, and result links use it"
        notes += [(name, reason) for name in repository]
    if role == "worker" and "IEXEC_PUBLIC_CHAIN_ADDRESS" in present and settings.chain_rpc_url:
        notes.append(
            (
                "IEXEC_PUBLIC_CHAIN_ADDRESS",
                "no effect on this node: it uses its own IEXEC_PRIVATE_CHAIN_ADDRESS",
            )
        )
    known = {spec.env for spec in SETTINGS.values()}
    for name in sorted(present):
        if name.startswith("IEXEC_") and name not in known:
            notes.append((name, "not a setting of this pool: ignored"))
    return notes
