"""TDX pieces without a chain: the node's enclave API over real HTTP, the enclave signature
check before contributing, a node that runs no TDX, the start checks of a TDX node, the
simulated stages' formats, and the stand-ins' refusal of a chain that is not the devnet's."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from Crypto.Cipher import AES, PKCS1_v1_5
from Crypto.PublicKey import RSA
from Crypto.Util.Padding import unpad
from eth_account import Account

from cli.main import main
from devnet import tee_stages
from devnet.tee import StandInRefused, TeeStandIn
from poco.proofs import result_hash, result_seal, sign_enclave
from pool.settings import Settings, SettingsError
from pool.states import ReplicateStatus
from pool.tee import (
    WorkerpoolAuthorization,
    enclave_call_digest,
    personal_sign,
    personal_signer,
    web2_secret_digest,
)
from workers import tee as tee_mod
from workers.enclave_api import EnclaveApi
from workers.node import JobOutcome
from workers.tasks import compute_queues

TASK = "0x" + "ab" * 32
DIGEST = "0x" + "cd" * 32
WORKER = Account.from_key("0x" + "11" * 32).address
ENCLAVE_KEY = "0x" + "22" * 32
ENCLAVE = Account.from_key(ENCLAVE_KEY).address


# ---- the enclave API --------------------------------------------------------------------------
@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[EnclaveApi, str, list[str]]]:
    """The API of a node, its chain check answering what ``refusals`` holds (empty: fine)."""
    refusals: list[str] = []
    api = EnclaveApi("127.0.0.1:0", WORKER, lambda taskid: refusals[0] if refusals else "")
    api.start()
    api.expect(TASK, ENCLAVE, tmp_path / "computed.json")
    yield api, f"http://{api.address}", refusals
    api.stop()


def enclave_auth(key: str = ENCLAVE_KEY, taskid: str = TASK) -> dict[str, str]:
    return {"Authorization": personal_sign(key, enclave_call_digest(taskid, WORKER))}


def computed(**fields: Any) -> dict[str, Any]:
    signature = sign_enclave(
        ENCLAVE_KEY, result_hash(TASK, DIGEST), result_seal(WORKER, TASK, DIGEST)
    )
    return {"task-id": TASK, "result-digest": DIGEST, "enclave-signature": signature, **fields}


def test_the_enclave_api_takes_exit_causes_from_the_tasks_enclave_only(
    api: tuple[EnclaveApi, str, list[str]],
) -> None:
    server, url, _ = api
    causes = [{"cause": "PRE_COMPUTE_INPUT_FILE_DOWNLOAD_FAILED", "message": "404"}]
    path = f"{url}/compute/pre/{TASK}/exit-causes"
    # a task this node does not run: 404; another key than the task's enclave: 401
    other = "0x" + "cd" * 32
    answer = requests.post(f"{url}/compute/pre/{other}/exit-causes", json=causes, timeout=5)
    assert answer.status_code == 404
    assert requests.post(path, json=causes, timeout=5).status_code == 401
    forged = enclave_auth("0x" + "33" * 32)
    assert requests.post(path, json=causes, headers=forged, timeout=5).status_code == 401
    # malformed bodies: 400, nothing kept
    for body in ([], {"cause": "X"}, [{"message": "no cause"}]):
        answer = requests.post(path, json=body, headers=enclave_auth(), timeout=5)
        assert answer.status_code == 400
    answer = requests.post(path, data=b"{not json", headers=enclave_auth(), timeout=5)
    assert answer.status_code == 400
    assert server.exit_causes(TASK, "pre") == []
    # the enclave's causes: kept once (208 after), a name outside the stage's kept as its
    # unknown issue with the name in the message
    assert requests.post(path, json=causes, headers=enclave_auth(), timeout=5).status_code == 200
    again = requests.post(path, json=causes, headers=enclave_auth(), timeout=5)
    assert again.status_code == 208
    assert server.exit_causes(TASK, "pre") == [("PRE_COMPUTE_INPUT_FILE_DOWNLOAD_FAILED", "404")]
    strange = [{"cause": "POST_COMPUTE_ENCRYPTION_FAILED", "message": "hm"}, {"cause": "WHAT"}]
    post = f"{url}/compute/post/{TASK}/exit-causes"
    assert requests.post(post, json=strange, headers=enclave_auth(), timeout=5).status_code == 200
    assert server.exit_causes(TASK, "post") == [
        ("POST_COMPUTE_ENCRYPTION_FAILED", "hm"),
        ("POST_COMPUTE_FAILED_UNKNOWN_ISSUE", "WHAT"),
    ]
    # the deprecated route takes one cause
    server.expect(TASK, ENCLAVE, Path("/nonexistent/computed.json"))
    one = {"cause": "PRE_COMPUTE_TIMEOUT"}
    old = f"{url}/compute/pre/{TASK}/exit"
    assert requests.post(old, json=one, headers=enclave_auth(), timeout=5).status_code == 200
    assert server.exit_causes(TASK, "pre") == [("PRE_COMPUTE_TIMEOUT", "")]


def test_the_enclave_api_writes_the_computed_file_once_when_every_check_holds(
    api: tuple[EnclaveApi, str, list[str]], tmp_path: Path
) -> None:
    _, url, refusals = api
    path = f"{url}/compute/post/{TASK}/computed"
    written = tmp_path / "computed.json"
    bad = [
        (computed(**{"task-id": "0x" + "00" * 32}), 400),  # another task than the path's
        (computed(**{"result-digest": "0x" + "00" * 32}), 401),  # a zero digest
        (computed(**{"result-digest": "0x1234"}), 401),  # not a bytes32
        (computed(**{"enclave-signature": "0x" + "aa" * 64}), 401),  # not 65 bytes
        (computed(**{"callback-data": 7}), 400),
    ]
    for body, status in bad:
        assert requests.post(path, json=body, headers=enclave_auth(), timeout=5).status_code == (
            status
        ), body
    assert requests.post(path, json=computed(), timeout=5).status_code == 401  # no signature
    refusals.append("task is COMPLETED on chain")
    assert requests.post(path, json=computed(), headers=enclave_auth(), timeout=5).status_code == (
        401
    )
    assert not written.exists()
    refusals.clear()
    big = computed(**{"error-message": "x" * 70_000})
    assert requests.post(path, json=big, headers=enclave_auth(), timeout=5).status_code == 413
    answer = requests.post(path, json=computed(), headers=enclave_auth(), timeout=5)
    assert (answer.status_code, answer.text) == (200, TASK)
    kept = json.loads(written.read_text())
    assert kept["result-digest"] == DIGEST and kept["task-id"] == TASK
    # written once: a second file (even a valid one) is refused and changes nothing
    other = computed(**{"callback-data": "0x01"})
    assert requests.post(path, json=other, headers=enclave_auth(), timeout=5).status_code == 401
    assert json.loads(written.read_text()) == kept


# ---- the enclave signature, checked before anything is sent --------------------------------------
def test_an_enclave_signature_must_be_the_challenges_over_this_result() -> None:
    good = computed()["enclave-signature"]
    assert tee_mod.enclave_signature_problem(WORKER, TASK, DIGEST, ENCLAVE, good) == ""
    other_key = sign_enclave(
        "0x" + "33" * 32, result_hash(TASK, DIGEST), result_seal(WORKER, TASK, DIGEST)
    )
    assert "not the task's enclave" in tee_mod.enclave_signature_problem(
        WORKER, TASK, DIGEST, ENCLAVE, other_key
    )
    # the same signature for another digest or another worker is no good either
    other_digest = "0x" + "ce" * 32
    assert tee_mod.enclave_signature_problem(WORKER, TASK, other_digest, ENCLAVE, good)
    assert tee_mod.enclave_signature_problem(ENCLAVE, TASK, DIGEST, ENCLAVE, good)
    assert tee_mod.enclave_signature_problem(WORKER, TASK, DIGEST, "0x" + "00" * 20, good)
    assert tee_mod.enclave_signature_problem(WORKER, TASK, DIGEST, ENCLAVE, "")


@dataclass
class StubNode:
    """What workers/tee.py uses of a node; any transaction would fail the test."""

    address: str = WORKER
    tee: Any = None
    reports: list[tuple[str, ReplicateStatus, dict[str, Any]]] = field(default_factory=list)

    @property
    def wallet(self) -> Any:
        raise AssertionError("no transaction may be sent")

    def gas(self) -> Any:
        raise AssertionError("nothing is sent: the gas is not even looked at")

    def report(self, taskid: str, status: ReplicateStatus, **fields: Any) -> None:
        self.reports.append((taskid, status, fields))

    def _fail(self, taskid: str, status: ReplicateStatus, reason: str, **fields: Any) -> Any:
        self.reports.append((taskid, status, {"reason": reason, **fields}))
        return JobOutcome(taskid, str(status), reason)


def test_no_contribution_without_the_enclaves_signature() -> None:
    node = StubNode()
    forged = sign_enclave(
        "0x" + "44" * 32, result_hash(TASK, DIGEST), result_seal(WORKER, TASK, DIGEST)
    )
    state = {
        "tee": True,
        "digest": DIGEST,
        "enclave": ENCLAVE,
        "enclaveSignature": forged,
        "authorization": "0x" + "00" * 65,
        "resultProxy": "http://127.0.0.1:9",
    }
    outcome = tee_mod.contribute(node, TASK, state)  # type: ignore[arg-type]
    assert outcome.status == "CONTRIBUTE_FAILED"
    ((_, status, fields),) = node.reports
    assert status == ReplicateStatus.CONTRIBUTE_FAILED
    assert fields["cause"] == "ENCLAVE_SIGNATURE_NOT_FOUND"


def test_a_node_that_runs_no_tdx_refuses_a_tee_task_and_runs_nothing() -> None:
    node = StubNode(tee=None)
    outcome = tee_mod.compute(node, TASK, None, 0, 60, "0x", ENCLAVE)  # type: ignore[arg-type]
    assert outcome.status == "START_FAILED"
    ((_, status, fields),) = node.reports
    assert (status, fields["cause"]) == (ReplicateStatus.START_FAILED, "TEE_NOT_SUPPORTED")
    assert "never runs as a standard one" in fields["reason"]


# ---- a node declares TDX only when configured, after its checks --------------------------------
TDX_SETTINGS: dict[str, Any] = {
    "sms_tdx_url": "http://sms:13300",
    "result_proxy_url": "http://proxy:13200",
}


def test_a_node_declares_tdx_only_when_configured_and_after_its_host_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = Settings()
    assert compute_queues(off) == ["replicates.standard"] and tee_mod.start_check(off, 1) == []
    with pytest.raises(SettingsError, match="tee-tdx is not declared there"):
        compute_queues(Settings(worker_capabilities=("standard", "tee-tdx")))
    with pytest.raises(SettingsError, match="tee-scone"):
        compute_queues(Settings(worker_capabilities=("tee-scone",)))
    sim = Settings(worker_tdx="simulation", **TDX_SETTINGS)
    assert compute_queues(sim) == ["replicates.standard", "replicates.tee-tdx"]
    assert sim.node_capabilities() == ("standard", "tee-tdx")
    # the simulation runs against the devnet only
    lines = tee_mod.start_check(sim, 31337)
    assert any("SIMULATION" in line for line in lines)
    with pytest.raises(SettingsError, match="devnet only .* this chain is 42161"):
        tee_mod.start_check(sim, 42161)
    with pytest.raises(SettingsError, match="needs an SMS"):
        tee_mod.start_check(Settings(worker_tdx="simulation"), 31337)
    # on: a TDX guest (its device) and the secret provider agent
    device = tmp_path / "tdx_guest"
    monkeypatch.setattr(tee_mod, "TDX_GUEST_DEVICE", device)
    on = Settings(
        worker_tdx="on", tdx_secret_provider_agent=str(tmp_path / "agent"), **TDX_SETTINGS
    )
    with pytest.raises(SettingsError, match="tdx_guest is missing: this host is not a TDX guest"):
        tee_mod.start_check(on, 42161)
    monkeypatch.setattr(tee_mod, "TDX_GUEST_DEVICE", Path("/dev/null"))  # a character device
    with pytest.raises(SettingsError, match="agent .* is not an executable"):
        tee_mod.start_check(on, 42161)
    agent = tmp_path / "agent"
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    assert any("present, configfs TSM reports" in line for line in tee_mod.start_check(on, 42161))


# ---- the simulated stages: iExec's formats ------------------------------------------------------
def test_the_simulated_post_compute_encrypts_and_signs_as_iexecs_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = RSA.generate(2048)
    pem = key.publickey().export_key()
    monkeypatch.setenv("RESULT_ENCRYPTION", "true")
    monkeypatch.setenv("RESULT_ENCRYPTION_PUBLIC_KEY", base64.b64encode(pem).decode())
    zipped = b"PK a result archive"
    outer = zipfile.ZipFile(io.BytesIO(tee_stages.encrypt_for_beneficiary(zipped)))
    assert sorted(outer.namelist()) == ["aes-key.rsa", "iexec_out.zip.aes"]
    wrapped = outer.read("aes-key.rsa")
    assert len(wrapped) == 256  # RSA-2048, PKCS#1 v1.5 (what the SDK's forge decrypts)
    aes_key = PKCS1_v1_5.new(key).decrypt(wrapped, b"")
    encrypted = outer.read("iexec_out.zip.aes")
    cipher = AES.new(aes_key, AES.MODE_CBC, iv=encrypted[:16])  # the IV first
    assert unpad(cipher.decrypt(encrypted[16:]), 16) == zipped
    # a malformed key is named
    monkeypatch.setenv("RESULT_ENCRYPTION_PUBLIC_KEY", "bm90IGEga2V5")
    with pytest.raises(tee_stages.Failure) as caught:
        tee_stages.encrypt_for_beneficiary(zipped)
    assert caught.value.cause == "POST_COMPUTE_MALFORMED_ENCRYPTION_PUBLIC_KEY"
    # its signatures recover as PoCo and the node check them
    digest = tee_stages.concatenate_and_hash(TASK, WORKER)
    signature = tee_stages.sign(ENCLAVE_KEY, digest)
    assert personal_signer(enclave_call_digest(TASK, WORKER), signature) == ENCLAVE.lower()
    # the digest of a directory: keccak256 of its direct entries' sha256, sorted by path
    monkeypatch.setattr(tee_stages, "IEXEC_OUT", tmp_path)
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    expected = tee_stages.concatenate_and_hash(
        tee_stages.sha256_hex(b"a"), tee_stages.sha256_hex(b"b")
    )
    assert tee_stages.web2_digest({"deterministic-output-path": str(tmp_path)}) == expected
    assert tee_stages.web2_digest({"deterministic-output-path": str(tmp_path / "a.txt")}) == (
        tee_stages.sha256_hex(b"a")
    )
    with pytest.raises(tee_stages.Failure, match="is outside"):
        tee_stages.web2_digest({"deterministic-output-path": "/etc/hostname"})


def test_a_simulated_stage_refuses_a_session_that_names_no_devnet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith(("WORKERPOOL_TEE", "SIGN_", "WORKER_HOST")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IEXEC_TASK_ID", TASK)
    monkeypatch.setenv("WORKERPOOL_TEE_SIMULATION_CHAIN_ID", "42161")
    reported: list[Any] = []

    def report(stage: str, taskid: str, failures: list[Any]) -> int:
        reported.extend(failures)
        return 1

    monkeypatch.setattr(tee_stages, "report", report)
    assert tee_stages.main(["tee_stages.py", "post-compute"]) == 1
    (failure,) = reported
    assert failure.cause == "POST_COMPUTE_FAILED_UNKNOWN_ISSUE"
    assert "devnet only" in failure.message
    monkeypatch.delenv("IEXEC_TASK_ID")
    assert tee_stages.main(["tee_stages.py", "pre-compute"]) == 3  # no task id: exit 3


# ---- the stand-ins serve the devnet only ---------------------------------------------------------
class OtherChain(http.server.BaseHTTPRequestHandler):
    """A JSON-RPC node of Arbitrum One's chain id (42161)."""

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": "0xa4b1"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_chain() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OtherChain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_stand_ins_refuse_to_start_on_a_chain_that_is_not_the_devnets(
    other_chain: str, tmp_path: Path
) -> None:
    hub = "0x" + "12" * 20
    with pytest.raises(StandInRefused, match="devnet only .* is chain 42161"):
        TeeStandIn(other_chain, hub, "http://127.0.0.1:9")
    # and so does the command that serves them
    (tmp_path / "devnet.json").write_text(json.dumps({"rpc_url": other_chain, "hub": hub}))
    result = CliRunner().invoke(main, ["devnet", "tee-serve", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "serve the devnet only" in result.output


def test_what_the_sms_and_worker_sign_is_iexecs_digest() -> None:
    # a web2 secret: keccak(keccak(domain) ‖ owner ‖ keccak(name) ‖ keccak(value)), as the
    # SDK's getChallengeForSetWeb2Secret
    owner = WORKER
    signature = personal_sign("0x" + "11" * 32, web2_secret_digest(owner, "n", "v"))
    assert personal_signer(web2_secret_digest(owner, "n", "v"), signature) == owner.lower()
    assert personal_signer(web2_secret_digest(owner, "n", "w"), signature) != owner.lower()
    auth = WorkerpoolAuthorization(TASK, "0x" + "01" * 32, 3, WORKER, ENCLAVE, "0x" + "ee" * 65)
    wire = auth.to_json()
    assert wire["signature"] == {"value": "0x" + "ee" * 65} and wire["taskIndex"] == 3
    assert WorkerpoolAuthorization.from_json(wire) == WorkerpoolAuthorization(
        TASK, "0x" + "01" * 32, 3, WORKER, ENCLAVE, "0x" + "ee" * 65
    )
    for broken in ({**wire, "workerWallet": "nope"}, {**wire, "taskIndex": -1}, [wire]):
        with pytest.raises(ValueError):
            WorkerpoolAuthorization.from_json(broken)


def test_a_session_naming_other_stage_images_or_another_app_is_refused() -> None:
    settings = Settings(
        worker_tdx="simulation",
        tdx_pre_compute_image="pre:1",
        tdx_post_compute_image="post:1",
        **TDX_SETTINGS,
    )
    runner = tee_mod.TdxRunner(settings, None, None, None)  # type: ignore[arg-type]

    def session(**images: str) -> dict[str, Any]:
        names = {"pre-compute": "pre:1", "app": "app:1", "post-compute": "post:1", **images}
        return {name: {"name": name, "image_name": image} for name, image in names.items()}

    assert runner._session_problem(session(), "app:1") == ""
    assert "WORKERPOOL_TDX_POST_COMPUTE_IMAGE" in runner._session_problem(
        session(**{"post-compute": "evil:1"}), "app:1"
    )
    assert "names pre2:1 as the pre-compute image" in runner._session_problem(
        session(**{"pre-compute": "pre2:1"}), "app:1"
    )
    assert "the app on chain is app:1" in runner._session_problem(session(app="other:1"), "app:1")
    no_post = session()
    del no_post["post-compute"]
    assert "no app or post-compute service" in runner._session_problem(no_post, "app:1")


def test_a_second_tdx_node_on_the_same_port_is_refused_with_what_to_set(
    api: tuple[EnclaveApi, str, list[str]],
) -> None:
    taken = api[0].address
    settings = Settings(worker_tdx="simulation", worker_api_bind=taken, **TDX_SETTINGS)
    wallet = Account.from_key(ENCLAVE_KEY)
    runner = tee_mod.TdxRunner(settings, None, wallet, None)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="each TDX node of a host needs its own port"):
        runner.start_api()
