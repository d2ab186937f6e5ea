"""TDX tasks on the devnet, with real workers, a real IPFS node and the devnet's TEE stand-ins
(SIMULATION: the SMS and result proxy of devnet/tee.py, the stage images of
devnet/tee_stages.py; no enclave, no attestation): a TDX deal of an outside requester ends
COMPLETED with the enclave challenge on chain and a result only its key opens; TDX deals go
to TDX nodes only; the SMS and each stage failing end as reported failures with their cause;
the stand-ins serve the devnet only."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import io
import json
import os
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from api_support import serve, wait_for
from click.testing import CliRunner
from conftest import require_service
from Crypto.Cipher import AES, PKCS1_v1_5
from Crypto.PublicKey import RSA
from Crypto.Util.Padding import pad, unpad
from devnet_fixtures import DevnetHandle, free_port
from eth_account import Account
from pool_fixtures import RunningPool, pool_running

from api.app import create_app as create_api
from cli.main import main
from devnet import network
from devnet.network import cache_dir
from devnet.requester import deal_params, match_deal
from devnet.tee import (
    POST_COMPUTE_IMAGE,
    PRE_COMPUTE_IMAGE,
    SIMULATION_TEXT,
    Faults,
    TeeStandIn,
    create_app,
)
from orders.store import OrderStore
from poco import actions
from poco.proofs import recover_authorization_signer, task_id
from poco.results import parse_result_link
from poco.types import ChainTaskStatus, ContributionStatus
from pool.messages import AuthorizeRequest
from pool.settings import Settings
from pool.tee import (
    SECRET_RESULT_ENCRYPTION_KEY,
    SmsClient,
    WorkerpoolAuthorization,
    challenge_request_digest,
    personal_sign,
    web3_secret_digest,
    worker_request_digest,
)

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

TDX = "0x" + "00" * 31 + "09"
STAGES = {
    "WORKERPOOL_TDX_PRE_COMPUTE_IMAGE": PRE_COMPUTE_IMAGE,
    "WORKERPOOL_TDX_POST_COMPUTE_IMAGE": POST_COMPUTE_IMAGE,
}
TDX_NODE: dict[str, Any] = {
    "WORKERPOOL_WORKER_TDX": "simulation",
    "WORKERPOOL_WORKER_API_BIND": "127.0.0.1:0",
}


# ---- the stand-ins and a TDX pool -------------------------------------------------------------
@pytest.fixture
def stage_images(docker_client: Any) -> dict[str, str]:
    import docker

    for tag in (PRE_COMPUTE_IMAGE, POST_COMPUTE_IMAGE):
        try:
            docker_client.images.get(tag)
        except docker.errors.ImageNotFound:
            pytest.fail(f"{tag} is missing: ops/apps/build tee-pre-compute tee-post-compute")
    return STAGES


@pytest.fixture
def stand_in(
    devnet: DevnetHandle, ipfs_api_url: str, ipfs_gateway_url: str
) -> Iterator[tuple[TeeStandIn, str]]:
    """The devnet's SMS and result proxy stand-ins, served here over real HTTP."""
    tee = TeeStandIn(
        devnet.info["rpc_url"], devnet.info["hub"], ipfs_api_url, ipfs_gateway_url=ipfs_gateway_url
    )
    with serve(create_app(tee)) as url:
        yield tee, url


@contextmanager
def tdx_pool(
    devnet: DevnetHandle, redis_url: str, ipfs_api_url: str, tmp: Path, sms: str, **env: str
) -> Iterator[RunningPool]:
    tmp.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "WORKERPOOL_TEE_STACK": "tdx",
        "WORKERPOOL_SMS_TDX_URL": sms,
        "WORKERPOOL_RESULT_PROXY_URL": sms,
        **STAGES,
        **env,
    }
    with pool_running(devnet, redis_url, ipfs_api_url, tmp, db="tdx", **settings) as pool:
        yield pool


def outside_requester(devnet: DevnetHandle, nrlc: int = 100 * 10**9) -> str:
    """A requester of its own (a new key, not one of the devnet's roles), with gas and stake."""
    account = Account.create()
    key = "0x" + bytes(account.key).hex()
    devnet.rpc("anvil_setBalance", [account.address, hex(10**20)])
    deployer = devnet.wallet("deployer")
    deployer.transact(devnet.client.rlc().functions.transfer(account.address, nrlc))
    actions.deposit(devnet.client.wallet(key), nrlc)
    return key


def rsa_key() -> RSA.RsaKey:
    return RSA.generate(2048)


def push_encryption_key(sms: str, requester_key: str, key: RSA.RsaKey) -> None:
    """What ``iexec result push-encryption-key`` does: the public key, PEM in base64, as the
    beneficiary's web2 secret."""
    pem = key.publickey().export_key().decode()
    owner = Account.from_key(requester_key).address
    value = base64.b64encode(pem.encode()).decode()
    SmsClient(sms).set_web2_secret(requester_key, owner, SECRET_RESULT_ENCRYPTION_KEY, value)


def tdx_deal(pool: RunningPool, requester_key: str, app: str = "echo", **params: Any) -> str:
    deal = pool.match(
        app=app,
        requester_key=requester_key,
        tag=TDX,
        trust=1,
        params=deal_params(**params),
    )
    return deal.taskids()[0]


def decrypt_result(archive: bytes, key: RSA.RsaKey) -> zipfile.ZipFile:
    """Open an encrypted result as ``iexec result decrypt`` does."""
    outer = zipfile.ZipFile(io.BytesIO(archive))
    assert sorted(outer.namelist()) == ["aes-key.rsa", "iexec_out.zip.aes"]
    sentinel = b"\x00" * 32
    try:
        aes_key = PKCS1_v1_5.new(key).decrypt(outer.read("aes-key.rsa"), sentinel)
    except ValueError:  # a ciphertext beyond this key's modulus
        aes_key = sentinel
    assert len(aes_key) == 32 and aes_key != sentinel, "the key does not open this result"
    encrypted = outer.read("iexec_out.zip.aes")
    plain = unpad(AES.new(aes_key, AES.MODE_CBC, iv=encrypted[:16]).decrypt(encrypted[16:]), 16)
    return zipfile.ZipFile(io.BytesIO(plain))


def replicate_of(pool: RunningPool, taskid: str) -> dict[str, Any]:
    (rep,) = pool.store.replicates_of(taskid)
    return rep


def final_replicate(pool: RunningPool, taskid: str) -> dict[str, Any] | None:
    reps = pool.store.replicates_of(taskid)
    finals = {"COMPLETED", "START_FAILED", "APP_DOWNLOAD_FAILED", "COMPUTE_FAILED"}
    finals |= {"CONTRIBUTE_FAILED", "ABORTED"}
    return reps[0] if len(reps) == 1 and reps[0]["status"] in finals else None


def last_cause(rep: dict[str, Any]) -> str:
    return str(rep["timeline"][-1].get("cause", ""))


# ---- a deal of an outside requester, routed to TDX nodes only -----------------------------------
@pytest.mark.timeout(420)
def test_a_tdx_deal_of_an_outside_requester_completes_for_its_key_only_on_tdx_nodes_only(
    devnet: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    ipfs_gateway_url: str,
    app_images: dict[str, str],
    stage_images: dict[str, str],
    stand_in: tuple[TeeStandIn, str],
    tmp_path: Path,
) -> None:
    _, sms = stand_in
    requester = outside_requester(devnet)
    key = rsa_key()
    push_encryption_key(sms, requester, key)
    with tdx_pool(devnet, redis_url, ipfs_api_url, tmp_path, sms) as pool:
        standard = pool.worker_address(0)
        pool.start_worker(0)  # a standard node: it never runs a TDX task
        # Given a deal tagged tee,tdx (0x…09) matched by a requester of its own
        taskid = tdx_deal(
            pool,
            requester,
            iexec_args="hello tdx",
            iexec_result_encryption=True,
            iexec_result_storage_provider="ipfs",
        )
        # Then with no TDX node it waits, its enclave challenge from the SMS already stored
        waiting = wait_for(
            lambda: (pool.store.task(taskid) or {}).get("waitingReason"), 90, "the wait reason"
        )
        assert waiting == "waiting: no live worker serves replicates.tee-tdx"
        task = pool.store.task(taskid) or {}
        challenge = task["enclaveChallenge"]
        assert int(challenge, 16) != 0 and task["smsUrl"] == sms
        assert pool.store.replicates_of(taskid) == []

        # When a TDX node (simulation) joins, the task completes on it
        tdx_node = pool.worker_address(1)
        pool.start_worker(1, **TDX_NODE)
        (done,) = pool.wait_tasks([taskid], lambda d: d.get("status") == "COMPLETED", 180)
        reps = pool.store.replicates_of(taskid)
        assert [r["worker"] for r in reps] == [tdx_node] and standard != tdx_node
        statuses = [e["status"] for e in reps[0]["timeline"]]
        assert statuses[:4] == ["CREATED", "STARTING", "APP_DOWNLOADING", "COMPUTING"]
        assert statuses[-1] == "COMPLETED" and "COMPUTED" in statuses

    # Then on chain: one contributeAndFinalize carrying the challenge the scheduler obtained
    chain = devnet.client.view_task(taskid)
    assert chain.status == ChainTaskStatus.COMPLETED
    contribution = devnet.client.view_contribution(taskid, tdx_node)
    assert contribution.status == ContributionStatus.PROVED
    assert contribution.enclave_challenge.lower() == challenge.lower()
    assert chain.contributors == (devnet.client.w3.to_checksum_address(tdx_node),)
    # And the result on IPFS is encrypted: only the requester's key opens it
    storage, location = parse_result_link(chain.results)
    assert storage == "ipfs" and done["resultLink"] == chain.results.decode()
    archive = requests.get(f"{ipfs_gateway_url}{location}", timeout=30).content
    assert b"hello tdx" not in archive
    inner = decrypt_result(archive, key)
    result = inner.read("result.txt").decode()
    assert "args: hello tdx" in result and f"IEXEC_TASK_ID={taskid}" in result
    assert "computed.json" in inner.namelist()
    with pytest.raises(AssertionError, match="does not open"):
        decrypt_result(archive, rsa_key())


# ---- failures: the SMS and each stage -----------------------------------------------------------
FILES: dict[str, bytes] = {"/ok": b"an input file\n"}


class Files(http.server.BaseHTTPRequestHandler):
    """Input files and datasets: the paths of FILES, anything else 404."""

    def do_GET(self) -> None:
        body = FILES.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def inputs_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def encrypted_dataset(
    devnet: DevnetHandle, url: str, content: bytes, *, sms: str = "", bad_checksum: bool = False
) -> str:
    """A dataset of the app provider's, encrypted as iExec datasets are (AES-256-CBC, the IV
    first), served at ``url``; its key pushed to the SMS (web3 secret) when ``sms`` is given."""
    key = os.urandom(32)
    iv = os.urandom(16)
    encrypted = iv + AES.new(key, AES.MODE_CBC, iv=iv).encrypt(pad(content, 16))
    FILES["/" + url.split("/", 3)[3]] = encrypted
    checksum = hashlib.sha256(b"other" if bad_checksum else encrypted).digest()
    owner = devnet.wallet("app_provider")
    registry = devnet.client.contract("DatasetRegistry", devnet.info["dataset_registry"])
    args = (owner.address, f"data-{os.urandom(4).hex()}", url.encode(), checksum)
    dataset = str(registry.functions.predictDataset(*args).call())
    owner.transact(registry.functions.createDataset(*args))
    if sms:
        value = base64.b64encode(key).decode()
        signature = personal_sign(devnet.key("app_provider"), web3_secret_digest(dataset, value))
        answer = requests.post(
            f"{sms}/secrets/web3",
            params={"secretAddress": dataset},
            data=value,
            headers={"Authorization": signature},
            timeout=10,
        )
        assert answer.status_code == 204, answer.text
    return dataset


def dataset_deal(pool: RunningPool, requester_key: str, dataset: str) -> str:
    deal = pool.match(
        requester_key=requester_key,
        tag=TDX,
        trust=1,
        dataset=dataset,
        dataset_owner_key=pool.devnet.key("app_provider"),
    )
    return deal.taskids()[0]


@pytest.mark.timeout(600)
def test_the_sms_and_each_stage_failing_end_as_reported_failures_with_their_cause(
    devnet: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    stage_images: dict[str, str],
    stand_in: tuple[TeeStandIn, str],
    inputs_url: str,
    tmp_path: Path,
) -> None:
    tee, sms = stand_in
    requester = outside_requester(devnet)
    push_encryption_key(sms, requester, rsa_key())
    no_key = outside_requester(devnet)  # a beneficiary that pushed no encryption key
    secret = b"a confidential dataset\n"
    datasets = {
        name: encrypted_dataset(devnet, f"{inputs_url}/{name}", secret, **kw)
        for name, kw in (
            ("decrypted", {"sms": sms}),
            ("bad-checksum", {"sms": sms, "bad_checksum": True}),
            ("no-key", {}),
        )
    }
    with tdx_pool(devnet, redis_url, ipfs_api_url, tmp_path, sms) as pool:
        # Given TDX deals that fail each their way (matched before any TDX node is up, so
        # that each task's fault is set before its session is asked)
        cases = {
            "no beneficiary key": (
                tdx_deal(pool, no_key, iexec_result_encryption=True),
                "START_FAILED",
                "TEE_SESSION_GENERATION_POST_COMPUTE_GET_ENCRYPTION_TOKENS_FAILED_EMPTY_BENEFICIARY_KEY",
            ),
            "session refused": (
                tdx_deal(pool, requester, iexec_args="refused"),
                "START_FAILED",
                "TEE_SESSION_GENERATION_SECURE_SESSION_GENERATION_FAILED",
            ),
            "input file 404": (
                tdx_deal(pool, requester, iexec_input_files=[f"{inputs_url}/missing"]),
                "COMPUTE_FAILED",
                "PRE_COMPUTE_INPUT_FILE_DOWNLOAD_FAILED",
            ),
            "pre-compute without task id": (
                tdx_deal(pool, requester, iexec_input_files=[f"{inputs_url}/ok"]),
                "COMPUTE_FAILED",
                "PRE_COMPUTE_TASK_ID_MISSING",
            ),
            "no computed file": (
                tdx_deal(pool, requester, app="nocomputed"),
                "COMPUTE_FAILED",
                "POST_COMPUTE_COMPUTED_FILE_NOT_FOUND",
            ),
            "post-compute cannot report": (
                tdx_deal(pool, requester, iexec_args="no key"),
                "COMPUTE_FAILED",
                "POST_COMPUTE_EXIT_REPORTING_FAILED",
            ),
            "post-compute without task id": (
                tdx_deal(pool, requester, iexec_args="no task"),
                "COMPUTE_FAILED",
                "POST_COMPUTE_TASK_ID_MISSING",
            ),
            "app crashes": (
                tdx_deal(pool, requester, app="crash"),
                "COMPUTE_FAILED",
                "APP_COMPUTE_FAILED",
            ),
            "dataset without its key in the SMS": (
                dataset_deal(pool, requester, datasets["no-key"]),
                "START_FAILED",
                "TEE_SESSION_GENERATION_PRE_COMPUTE_GET_DATASET_SECRET_FAILED",
            ),
            "dataset of another checksum": (
                dataset_deal(pool, requester, datasets["bad-checksum"]),
                "COMPUTE_FAILED",
                "PRE_COMPUTE_INVALID_DATASET_CHECKSUM",
            ),
            # and beside them, a dataset the pre-compute stage decrypts for the app, and a
            # result delivered to a callback (its digest keccak256 of the callback data)
            "dataset decrypted": (
                dataset_deal(pool, requester, datasets["decrypted"]),
                "COMPLETED",
                "",
            ),
            "callback delivered": (
                pool.match(
                    app="callback",
                    requester_key=requester,
                    tag=TDX,
                    trust=1,
                    params=deal_params("to the consumer"),
                    callback=Account.from_key(requester).address,
                ).taskids()[0],
                "COMPLETED",
                "",
            ),
        }
        tee.task_faults[cases["session refused"][0]] = Faults(
            session_error="SECURE_SESSION_GENERATION_FAILED"
        )
        tee.task_faults[cases["pre-compute without task id"][0]] = Faults(
            drop_env={"pre-compute": ("IEXEC_TASK_ID",)}
        )
        tee.task_faults[cases["post-compute cannot report"][0]] = Faults(
            drop_env={"post-compute": ("SIGN_TEE_CHALLENGE_PRIVATE_KEY",)}
        )
        tee.task_faults[cases["post-compute without task id"][0]] = Faults(
            drop_env={"post-compute": ("IEXEC_TASK_ID",)}
        )
        # When a TDX node runs them
        pool.start_worker(1, **TDX_NODE, WORKERPOOL_WORKER_SLOTS="4")
        taskids = [taskid for taskid, _, _ in cases.values()]
        wait_for(lambda: all(final_replicate(pool, t) for t in taskids), 400, "the failures")
        # Then each ends reported with its cause, and nothing was contributed
        for name, (taskid, status, cause) in cases.items():
            rep = replicate_of(pool, taskid)
            assert (rep["status"], last_cause(rep)) == (status, cause), (name, rep["timeline"])
            if status != "COMPLETED":
                assert devnet.client.view_task(taskid).contributors == (), name
        done = devnet.client.view_task(cases["dataset decrypted"][0])
        _, location = parse_result_link(done.results)
        archive = requests.post(
            f"{ipfs_api_url}/api/v0/cat", params={"arg": location, "timeout": "5s"}, timeout=10
        ).content
        result = zipfile.ZipFile(io.BytesIO(archive)).read("result.txt").decode()
        assert f"IEXEC_DATASET_FILENAME={datasets['decrypted']}".lower() in result.lower()
        assert secret.decode() in result
        delivered = devnet.client.view_task(cases["callback delivered"][0])
        assert delivered.results_callback == b"to the consumer"
        assert parse_result_link(delivered.results)[0] == "ethereum"
        crash = replicate_of(pool, cases["app crashes"][0])
        assert "app exited with code 3" in crash["timeline"][-1]["note"]
        assert "POST_COMPUTE_COMPUTED_FILE_NOT_FOUND" in crash["timeline"][-1]["note"]
        # and no task got a second replicate: re-running elsewhere would fail the same way
        for taskid in taskids:
            assert len(pool.store.replicates_of(taskid)) == 1


# ---- the scheduler's side: the SMS's framework, its challenges, trust ----------------------------
@pytest.mark.timeout(300)
def test_the_scheduler_checks_the_sms_framework_waits_for_challenges_and_skips_trust_above_1(
    devnet: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    stand_in: tuple[TeeStandIn, str],
    tmp_path: Path,
) -> None:
    tee, sms = stand_in
    requester = outside_requester(devnet)
    # an SMS that runs another framework: the task fails before any transaction
    tee.faults = Faults(framework="SCONE")
    with tdx_pool(devnet, redis_url, ipfs_api_url, tmp_path / "a", sms) as pool:
        taskid = tdx_deal(pool, requester)
        (task,) = pool.wait_tasks([taskid], lambda d: d.get("status") == "INITIALIZE_FAILED", 60)
        assert f"the SMS {sms} runs SCONE, not TDX" in task["failureReason"]
        assert pool.chain_status(taskid) == ChainTaskStatus.UNSET
    # an SMS that refuses challenges: the initialized task waits, then runs once it answers
    tee.faults = Faults(refuse_challenges=True)
    with tdx_pool(devnet, redis_url, ipfs_api_url, tmp_path / "b", sms) as pool:
        taskid = tdx_deal(pool, requester)
        reason = wait_for(
            lambda: (pool.store.task(taskid) or {}).get("waitingReason"), 60, "the wait"
        )
        assert reason.startswith("waiting: no enclave challenge from the SMS yet")
        task = pool.store.task(taskid) or {}
        assert task["status"] == "INITIALIZED" and not task.get("enclaveChallenge")
        assert pool.chain_status(taskid) == ChainTaskStatus.ACTIVE
        tee.faults = Faults()
        (task,) = pool.wait_tasks([taskid], lambda d: bool(d.get("enclaveChallenge")), 60)
        assert task["status"] == "RUNNING"
        # a TEE deal of trust above 1 is skipped, with iexec-core's reason
        deal = pool.match(requester_key=requester, tag=TDX, trust=3)
        wait_for(lambda: pool.store.deal(deal.dealid), 60, "the deal stored")
        skipped = pool.store.deal(deal.dealid) or {}
        assert skipped["status"] == "SKIPPED" and "trust 0 or 1" in skipped["skipReason"]


# ---- the iExec SDK 9 fills a TDX order the pool published ------------------------------------
SDK = "iexec@9.0.1"


@pytest.fixture(scope="session")
def sdk_bin() -> Path:
    """The iExec SDK's CLI from npm, installed once in the tools cache (tests/test_requester.py
    installs it in the same place)."""
    root = cache_dir() / "requester-tools"
    cli = root / "node_modules" / ".bin" / "iexec"
    if not cli.exists():
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "package.json").exists():
            (root / "package.json").write_text('{"name": "requester-tools", "private": true}')
        proc = subprocess.run(
            ["npm", "install", SDK, "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            require_service("npm packages", f"npm install {SDK}: {proc.stderr[-1000:]}")
    return cli


def iexec(sdk: Path, folder: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [str(sdk), *args, "--raw"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"iexec {' '.join(args)} printed nothing: {proc.stderr[-2000:]}"
    answer: dict[str, Any] = json.loads(lines[-1])
    assert answer.get("ok"), (args, answer, proc.stderr[-2000:])
    return answer


def own_app(devnet: DevnetHandle, owner_key: str, image: str) -> str:
    """An app of the requester's own on the devnet registry (SDK 9 signs its app order)."""
    owner = devnet.client.wallet(owner_key)
    registry = devnet.client.contract("AppRegistry", devnet.info["app_registry"])
    args = (
        owner.address,
        f"tdx-echo-{owner.address[2:8]}",
        "DOCKER",
        image.encode(),
        b"\0" * 32,
        b"",
    )
    app = str(registry.functions.predictApp(*args).call())
    owner.transact(registry.functions.createApp(*args))
    return app


@pytest.mark.timeout(600)
def test_the_iexec_sdk_9_fills_a_tdx_order_the_pool_published_and_decrypts_the_result(
    devnet: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    ipfs_gateway_url: str,
    app_images: dict[str, str],
    stage_images: dict[str, str],
    stand_in: tuple[TeeStandIn, str],
    sdk_bin: Path,
    tmp_path: Path,
) -> None:
    _, sms = stand_in
    requester = outside_requester(devnet)
    app = own_app(devnet, requester, app_images["echo"])
    # Given a TDX pool that keeps its TDX capacity on sale (trust 1) in its own orderbook
    with tdx_pool(
        devnet,
        redis_url,
        ipfs_api_url,
        tmp_path / "pool",
        sms,
        WORKERPOOL_REPLENISH_ORDERS="1",
        WORKERPOOL_ORDER_TAG="tee,tdx",
        WORKERPOOL_ORDER_TRUST="1",
    ) as pool:
        pool.start_worker(1, **TDX_NODE)
        book = OrderStore(pool.store.db)
        listed = wait_for(lambda: book.orders.find_one({"status": "open"}), 60, "a TDX order")
        assert listed["order"]["tag"] == TDX and listed["order"]["trust"] == 1
        with serve(create_api(Settings.from_env(pool.env), pool.store)) as api:
            # And a requester on the iExec SDK 9 pointed at the devnet, the pool's orderbook
            # and the SMS stand-in
            folder = tmp_path / "requester"
            folder.mkdir()
            chain = {
                "id": str(devnet.client.chain_id),
                "host": devnet.info["rpc_url"],
                "hub": devnet.info["hub"],
                "sms": sms,
                "iexecGateway": api,
                "compass": api,
                "ipfsGateway": ipfs_gateway_url,
            }
            (folder / "chain.json").write_text(
                json.dumps({"default": "dev", "chains": {"dev": chain}})
            )
            iexec(sdk_bin, folder, "wallet", "import", requester, "--unencrypted", "--force")
            iexec(sdk_bin, folder, "result", "generate-encryption-keypair", "--force")
            iexec(sdk_bin, folder, "result", "push-encryption-key")
            # When it runs its app on the pool's TDX order, with an encrypted result
            run = iexec(
                sdk_bin,
                folder,
                "app",
                "run",
                app,
                "--workerpool",
                devnet.info["workerpool"],
                "--tag",
                "tee,tdx",
                "--trust",
                "1",
                "--args",
                "hello sdk",
                "--encrypt-result",
                "--force",
            )
            (deal,) = run["deals"]
            assert devnet.client.view_deal(deal["dealid"]).tag == TDX
            taskid = task_id(deal["dealid"], 0)
            pool.wait_tasks([taskid], lambda d: d.get("status") == "COMPLETED", 240)
            # Then it downloads the result and opens it with its own key
            iexec(sdk_bin, folder, "task", "show", taskid, "--download", "result")
            iexec(sdk_bin, folder, "result", "decrypt", "result.zip", "--force")
    results = zipfile.ZipFile(folder / "results.zip")
    assert "args: hello sdk" in results.read("result.txt").decode()
    assert b"hello sdk" not in (folder / "result.zip").read_bytes()


# ---- the authorization carries the SMS's challenge; the SMS checks who asks ---------------------
def test_the_authorization_carries_the_sms_challenge_and_the_sms_checks_who_asks(
    devnet: DevnetHandle,
    make_scheduler: Any,
    store: Any,
    stand_in: tuple[TeeStandIn, str],
) -> None:
    _, sms = stand_in
    scheduler = make_scheduler(tee_stack=("tdx",), sms_tdx_url=sms, result_proxy_url=sms)
    owner = devnet.address("scheduler")
    deal = match_deal(
        devnet.client,
        app=devnet.app("echo"),
        app_owner_key=devnet.key("app_provider"),
        workerpool=devnet.info["workerpool"],
        scheduler_key=devnet.key("scheduler"),
        requester_key=devnet.key("requester"),
        tag=TDX,
    )
    (taskid,) = deal.taskids()
    wait_for(
        lambda: scheduler.tick() and (store.task(taskid) or {}).get("status") == "RUNNING",
        60,
        "the task initialized with its challenge",
    )
    challenge = store.task(taskid)["enclaveChallenge"]
    worker = devnet.accounts["workers"][7]["address"]
    # a node that did not declare TDX gets no authorization
    store.record_heartbeat(worker, {"capabilities": ["standard"], "slots": 2})
    refused = scheduler.authorizer.authorize(AuthorizeRequest(taskid, worker))
    assert not refused.granted and refused.requeue and "tee-tdx" in refused.reason
    # a TDX node gets the SMS's challenge signed in, whatever enclave it proposes
    store.record_heartbeat(worker, {"capabilities": ["standard", "tee-tdx"], "slots": 2})
    proposed = Account.create().address
    answer = scheduler.authorizer.authorize(AuthorizeRequest(taskid, worker, proposed))
    assert answer.granted and answer.fast_path and answer.enclave == challenge
    signer = recover_authorization_signer(answer.signature, worker, taskid, challenge)
    assert signer.lower() == owner.lower()

    # the SMS: a challenge is the pool owner's to ask, and the same one every time
    stranger = devnet.key("requester")
    forged = personal_sign(stranger, challenge_request_digest(taskid))
    answer_ = requests.post(
        f"{sms}/tee/challenges/{taskid}", headers={"authorization": forged}, timeout=10
    )
    assert answer_.status_code == 401
    assert answer_.headers["X-Workerpool-Simulation"] == SIMULATION_TEXT
    signed = personal_sign(devnet.key("scheduler"), challenge_request_digest(taskid))
    again = requests.post(
        f"{sms}/tee/challenges/{taskid}", headers={"authorization": signed}, timeout=10
    )
    assert again.text == challenge
    # a session: the worker's own signature, over an authorization the pool owner signed
    worker_key = devnet.worker_key(7)
    auth = WorkerpoolAuthorization(taskid, deal.dealid, 0, worker, challenge, answer.signature)
    mine = personal_sign(worker_key, worker_request_digest(worker, taskid, challenge))
    for header, body, error in (
        (forged, auth, "INVALID_AUTHORIZATION"),
        (
            personal_sign(worker_key, worker_request_digest(worker, taskid, proposed)),
            dataclasses.replace(auth, enclave_challenge=proposed),
            "EXECUTION_NOT_AUTHORIZED_INVALID_SIGNATURE",
        ),
    ):
        refused_ = requests.post(
            f"{sms}/tee/sessions",
            headers={"Authorization": header},
            json=body.to_json(),
            timeout=10,
        )
        assert (refused_.status_code, refused_.json()["error"]) == (401, error)
    # no upload token stored yet for this worker: the session is refused as iexec-sms does
    no_token = requests.post(
        f"{sms}/tee/sessions", headers={"Authorization": mine}, json=auth.to_json(), timeout=10
    )
    assert (no_token.status_code, no_token.json()["error"]) == (
        500,
        "POST_COMPUTE_GET_STORAGE_TOKENS_FAILED",
    )
    SmsClient(sms).set_web2_secret(worker_key, worker, "iexec-result-iexec-ipfs-token", "t0ken")
    made = requests.post(
        f"{sms}/tee/sessions", headers={"Authorization": mine}, json=auth.to_json(), timeout=10
    ).json()["data"]
    fetch = f"{made['secretProvisioningUrl']}/session/{made['sessionId']}"
    session = requests.get(fetch, timeout=10).json()
    assert requests.get(fetch, timeout=10).status_code == 404  # handed out once
    services = {s["name"]: s for s in session["services"]}
    assert sorted(services) == ["app", "post-compute"]  # no input file, no dataset
    assert services["post-compute"]["image_name"] == POST_COMPUTE_IMAGE
    post = services["post-compute"]["environment"]
    assert Account.from_key(post["SIGN_TEE_CHALLENGE_PRIVATE_KEY"]).address == challenge
    assert post["RESULT_STORAGE_TOKEN"] == "t0ken" and post["RESULT_STORAGE_PROXY"] == sms
    assert services["app"]["environment"]["IEXEC_TASK_ID"] == taskid
    assert "SIGN_TEE_CHALLENGE_PRIVATE_KEY" not in services["app"]["environment"]


# ---- `workerpool devnet up --tee tdx` ----------------------------------------------------------
def test_devnet_up_tee_starts_the_stand_ins_and_env_prints_what_the_pool_needs(
    devnet: DevnetHandle,
    ipfs_api_url: str,
    ipfs_gateway_url: str,
    stage_images: dict[str, str],
    docker_client: Any,
) -> None:
    import docker

    port = free_port()
    directory = str(devnet.directory)
    try:
        up = CliRunner().invoke(
            main,
            [
                *("devnet", "up", "--dir", directory, "--tee", "tdx", "--tee-port", str(port)),
                *("--ipfs-api", ipfs_api_url, "--ipfs-gateway", ipfs_gateway_url),
            ],
        )
        assert up.exit_code == 0, up.output
        assert "tdx SIMULATION: SMS and result proxy" in up.output
        about = requests.get(f"http://127.0.0.1:{port}/simulation", timeout=10)
        assert about.json()["simulation"] is True and about.json()["chainId"] == 31337
        assert requests.get(f"http://127.0.0.1:{port}/tee/framework", timeout=10).json() == "TDX"
        env = CliRunner().invoke(main, ["devnet", "env", "--dir", directory]).output
        for line in (
            "export WORKERPOOL_TEE_STACK=tdx",
            f"export WORKERPOOL_SMS_TDX_URL=http://127.0.0.1:{port}",
            f"export WORKERPOOL_RESULT_PROXY_URL=http://127.0.0.1:{port}",
            "export WORKERPOOL_WORKER_TDX=simulation",
            f"export WORKERPOOL_TDX_POST_COMPUTE_IMAGE={POST_COMPUTE_IMAGE}",
        ):
            assert line in env, env
        assert "# TDX SIMULATION" in env
    finally:
        assert network.stop_tee(devnet.directory)
        (devnet.directory / network.TEE_JSON).unlink(missing_ok=True)
    # the stage images are labelled, and refuse a session that names no devnet
    image = docker_client.images.get(PRE_COMPUTE_IMAGE)
    assert "no enclave" in image.labels["workerpool.simulation"]
    env_ = {"IEXEC_TASK_ID": "0x" + "ab" * 32, "WORKERPOOL_TEE_SIMULATION_CHAIN_ID": "42161"}
    with pytest.raises(docker.errors.ContainerError) as refused:
        docker_client.containers.run(
            PRE_COMPUTE_IMAGE, environment=env_, network_mode="none", remove=True, stderr=True
        )
    assert refused.value.exit_status == 2  # not run, and nobody to report to
    assert b"for the devnet only" in refused.value.stderr
