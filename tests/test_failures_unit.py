"""Failures the way iexec-worker handles them, on the worker's side, without Docker or a chain:
the error result (iexec-worker v9.2's bytes and digests), which failures end in one and which
are the node's own, the abort asked by the scheduler, the folders a node deletes, the
addresses downloads refuse, the caps on inputs, and the one parser of callback-data.

Real HTTP servers on 127.0.0.1 stand for the requester's servers; the app is played by the
fake runner of ``testing/`` (the real engine: tests/test_runner.py, tests/test_failures.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from engine_support import HttpServer as Server
from eth_account import Account
from eth_utils import keccak

from poco.proofs import sign_abort
from poco.results import callback_bytes
from poco.types import ChainTaskStatus, Deal, Resource
from pool.messages import CONTRIBUTE, REPORT, MessageSigner, Messenger
from pool.settings import Settings
from pool.states import ReplicateStatus, ReplicateStatusCause
from testing.celery import FAKE_DOMAIN, FakeCelery
from testing.chain import chain_task
from testing.runner import FakeRunner, default_fake_behaviour
from workers import inputs, results
from workers.inputs import AddressPolicy, DataDownloadError, DownloadBudget, non_global
from workers.node import ABORT_MARKER, ABORT_MARKER_TTL, WorkerNode, task_lock
from workers.runner import AppImageError, AppRun, EngineError, RunOutcome

R = ReplicateStatus
Cause = ReplicateStatusCause
MB = 1024 * 1024
KEY = "0x" + "5a" * 32  # a test key: the node signs its reports with it
ADDRESS = MessageSigner(KEY, FAKE_DOMAIN).address.lower()
TASK = "0x" + "0a" * 32
DEAL = "0x" + "de" * 32
APP = "0x" + "22" * 20
ZERO = "0x" + "00" * 20
LOCAL = AddressPolicy(allow_private=True)
POOL = "0x" + "11" * 20
# PUBLIC TEST KEY (anvil's default mnemonic, index 1): the pool owner, who signs aborts
OWNER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"

# sha256 of error.txt for each of iexec-worker's contributable causes (its v9.2 format)
VECTORS = {
    (R.APP_DOWNLOAD_FAILED, Cause.APP_IMAGE_DOWNLOAD_FAILED): (
        "0x6b234cc858ad3404f912dd7f119afe2178251bec64cb25e5cbeba61dd764fc5d"
    ),
    (R.DATA_DOWNLOAD_FAILED, Cause.DATASET_FILE_DOWNLOAD_FAILED): (
        "0x8e3ac3704dc9fd9bdec06799b85a570e7f67f3ff8cd751b11af241dddbe4996e"
    ),
    (R.DATA_DOWNLOAD_FAILED, Cause.DATASET_FILE_BAD_CHECKSUM): (
        "0xc276b4a3cbe341163601818dfa3d7f5f8db8cc35f00c9c30666864e39c96b565"
    ),
    (R.DATA_DOWNLOAD_FAILED, Cause.INPUT_FILES_DOWNLOAD_FAILED): (
        "0x0667139fc3aade5e376044a41fbf2b37df1f191ee28f04debc01c1d5c64c0a54"
    ),
}


# ---- the error result -------------------------------------------------------------------------
@pytest.mark.parametrize(("failure", "digest"), list(VECTORS.items()))
def test_error_result_is_iexec_workers_to_the_byte(
    failure: tuple[ReplicateStatus, ReplicateStatusCause], digest: str, tmp_path: Path
) -> None:
    status, cause = failure
    error = results.write_error_result(tmp_path / "out", str(status), [str(cause)])
    assert (
        error.read_bytes()
        == (
            f"[IEXEC] Errors occurred while computing the task [error:{status}, "
            f"causes:[WorkflowError[cause={cause}, message=]]]"
        ).encode()
    )
    assert (tmp_path / "out" / "computed.json").read_bytes() == (
        b'{"deterministic-output-path":"/iexec_out/error.txt","callback-data":null,'
        b'"task-id":null,"result-digest":null,"enclave-signature":null,"error-message":null}'
    )
    assert results.error_result_digest(tmp_path / "out", has_callback=False) == digest
    # the digest is the one of the ordinary rules for computed.json's deterministic path
    computed = results.read_computed(tmp_path / "out")
    assert results.result_digest(tmp_path / "out", computed, has_callback=False) == digest
    # a callback deal's error result: no bytes for the consumer
    assert results.error_result_digest(tmp_path / "out", has_callback=True) == (
        "0x" + keccak(b"").hex()
    )


def test_an_error_result_needs_a_cause_and_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cause"):
        results.write_error_result(tmp_path / "a", "COMPUTE_FAILED", [])
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        results.write_error_result(tmp_path / "b", "COMPUTE_FAILED", ["APP_COMPUTE_FAILED"])


# ---- callback-data: one parser ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("0x0102", b"\x01\x02"),
        ("0102", b"\x01\x02"),
        ("0x123", b"\x01\x23"),
        ("", b""),
        ("0x", b""),
    ],
)
def test_callback_data_is_read_as_web3j_reads_it(text: str, data: bytes) -> None:
    assert callback_bytes(text) == data


@pytest.mark.parametrize("text", ["0xzz", "0x12 34", "hello", "0X12"])
def test_callback_data_that_is_not_hex_is_refused_by_the_one_parser(text: str) -> None:
    with pytest.raises(ValueError, match="not hexadecimal"):
        callback_bytes(text)
    # the digest refuses it the same way (finalize cannot meet it later)
    with pytest.raises(results.ResultError, match="not hexadecimal"):
        results.web3_digest(results.ComputedFile(callback_data=text))


def test_odd_callback_data_hashes_the_bytes_finalize_sends() -> None:
    computed = results.ComputedFile(callback_data="0xabc")
    assert results.web3_digest(computed) == "0x" + keccak(b"\x0a\xbc").hex()
    assert callback_bytes("0xabc") == b"\x0a\xbc"


# ---- addresses downloads refuse -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("100.64.0.1", "not a global address"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),
        ("2002:7f00:1::", "loopback"),
    ],
)
def test_non_global_addresses_are_named(address: str, why: str) -> None:
    assert why in non_global(address)


@pytest.mark.parametrize("address", ["1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"])
def test_global_addresses_pass(address: str) -> None:
    assert non_global(address) == ""


@pytest.fixture
def servers() -> Iterator[Callable[[], Server]]:
    made: list[Server] = []

    def make() -> Server:
        made.append(Server())
        return made[-1]

    yield make
    for server in made:
        server.close()


def _fetch(url: str, policy: AddressPolicy, tmp_path: Path) -> list[str]:
    return inputs.download_inputs([url], tmp_path, max_bytes=MB, timeout=10, policy=policy)


def test_a_loopback_url_is_refused_before_any_connection(
    servers: Callable[[], Server], tmp_path: Path
) -> None:
    server = servers()
    server.routes["/secret"] = (200, {}, b"the pool's secret")
    for url in (server.url("/secret"), server.url("/secret", "localhost")):
        with pytest.raises(DataDownloadError, match="loopback address") as refused:
            _fetch(url, AddressPolicy(), tmp_path)
        assert "global addresses only" in str(refused.value) and not refused.value.node_fault
    assert server.requests == [] and list(tmp_path.iterdir()) == []
    # a devnet allows it
    assert _fetch(server.url("/secret"), LOCAL, tmp_path)


def test_the_metadata_address_is_refused_without_trying_it(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(DataDownloadError, match="169.254.169.254 is a cloud metadata address"):
        _fetch("http://169.254.169.254/latest/meta-data/iam/", AddressPolicy(), tmp_path)
    assert time.monotonic() - started < 2  # refused, not timed out on a connection


def test_a_redirect_to_loopback_is_refused_at_the_hop(
    servers: Callable[[], Server], tmp_path: Path
) -> None:
    # Given a server the pool allows by name (standing for a public one) that redirects to
    # another server on the node's loopback
    inner = servers()
    inner.routes["/secret"] = (200, {}, b"the node's secret")
    outer = servers()
    outer.routes["/data"] = (302, {"Location": inner.url("/secret")}, b"")
    policy = AddressPolicy(private_hosts=frozenset({f"127.0.0.1:{outer.port}"}))
    # When it is fetched, Then the redirect's target is refused, never asked
    with pytest.raises(DataDownloadError, match="loopback address"):
        _fetch(outer.url("/data"), policy, tmp_path)
    assert outer.requests == ["/data"] and inner.requests == []
    # And a redirect within the allowed server is followed
    outer.routes["/moved"] = (301, {"Location": "/file"}, b"")
    outer.routes["/file"] = (200, {}, b"content")
    [name] = _fetch(outer.url("/moved"), policy, tmp_path)
    assert (tmp_path / name).read_bytes() == b"content"


def test_too_many_redirects_end_the_download(servers: Callable[[], Server], tmp_path: Path) -> None:
    server = servers()
    server.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(DataDownloadError, match="more than 5 redirects"):
        _fetch(server.url("/loop"), LOCAL, tmp_path)


# ---- caps on inputs -----------------------------------------------------------------------------
def test_input_files_are_capped_in_number_and_in_total_size(
    servers: Callable[[], Server], tmp_path: Path
) -> None:
    server = servers()
    for n in range(4):
        server.routes[f"/{n}"] = (200, {}, bytes(300))
    urls = [server.url(f"/{n}") for n in range(4)]
    with pytest.raises(DataDownloadError, match="4 input files, more than this pool's limit of 3"):
        inputs.download_inputs(urls, tmp_path, max_bytes=MB, max_files=3, policy=LOCAL)
    assert server.requests == []
    budget = DownloadBudget(max_file=500, max_total=1000, deadline=time.monotonic() + 10)
    with pytest.raises(DataDownloadError, match="larger than the limit of 1000 bytes in all"):
        inputs.download_inputs(urls, tmp_path, max_bytes=500, budget=budget, policy=LOCAL)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        inputs.input_file_name(u) for u in urls[:3]
    )  # the fourth, which passed the total, was not kept


def test_the_dataset_counts_in_the_total_and_in_the_time(
    servers: Callable[[], Server], tmp_path: Path
) -> None:
    server = servers()
    data = bytes(600)
    server.routes["/ds"] = (200, {}, data)
    server.routes["/in"] = (200, {}, bytes(600))
    budget = DownloadBudget(max_file=MB, max_total=1000, deadline=time.monotonic() + 10)
    checksum = "0x" + hashlib.sha256(data).hexdigest()
    inputs.download_dataset(
        server.url("/ds"),
        checksum,
        tmp_path,
        "0x" + "ee" * 20,
        max_bytes=MB,
        budget=budget,
        policy=LOCAL,
    )
    with pytest.raises(DataDownloadError, match="in all"):
        inputs.download_inputs(
            [server.url("/in")], tmp_path, max_bytes=MB, budget=budget, policy=LOCAL
        )
    spent = DownloadBudget(max_file=MB, max_total=MB, deadline=time.monotonic() - 1)
    with pytest.raises(DataDownloadError, match="no time left"):
        inputs.download_inputs(
            [server.url("/in")], tmp_path, max_bytes=MB, budget=spent, policy=LOCAL
        )


def test_a_full_disk_is_the_nodes_failure_not_the_requesters(tmp_path: Path) -> None:
    def fetch(url: str, timeout: float) -> Iterator[bytes]:
        yield b"x"

    unwritable = tmp_path / "file-not-folder"
    unwritable.write_text("")
    with pytest.raises(DataDownloadError) as failed:
        inputs.download_inputs(["https://example.org/a"], unwritable, max_bytes=MB, fetch=fetch)
    assert failed.value.node_fault


# ---- the node: which failure ends how -----------------------------------------------------------
class Chain:
    """What a node reads of the chain while computing one task."""

    def __init__(self, *, callback: str = ZERO, params: str = "") -> None:
        self.deal = Deal(
            dealid=DEAL,
            app=Resource(APP, ZERO, 0),
            dataset=Resource(ZERO, ZERO, 0),
            workerpool=Resource(POOL, ZERO, 0),
            trust=1,
            category=0,
            tag="0x" + "00" * 32,
            requester=ZERO,
            beneficiary=ZERO,
            callback=callback,
            params=params,
            start_time=0,
            bot_first=0,
            bot_size=1,
            worker_stake=0,
            scheduler_reward_ratio=1,
            sponsor=ZERO,
        )
        self.tasks: dict[str, Any] = {}
        self.now = 1_000_000

    def view_deal(self, dealid: str) -> Deal:
        return self.deal

    def app_multiaddr(self, app: str) -> bytes:
        return b"registry.example/app:1"

    def workerpool_owner(self, pool: str) -> str:
        assert pool == POOL
        return str(Account.from_key(OWNER_KEY).address)

    def view_task(self, taskid: str) -> Any:
        return self.tasks.get(taskid) or chain_task(
            taskid, ChainTaskStatus.ACTIVE, final_deadline=self.now + 3000
        )

    def block_timestamp(self, *args: Any, **kwargs: Any) -> int:
        return self.now


class RaisingRunner(FakeRunner):
    def __init__(self, error: Exception, *, at: str = "run") -> None:
        super().__init__()
        self.error, self.at = error, at

    def ensure_image(self, image: str) -> None:
        if self.at == "image":
            raise self.error

    def run(self, run: AppRun) -> RunOutcome:
        raise self.error


def make_node(
    tmp_path: Path, runner: FakeRunner, celery: FakeCelery, chain: Any, **kw: Any
) -> WorkerNode:
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0",
        worker_name="t",
        app_output_tmpfs=False,
        app_output_limit_mb=1,
        **kw,
    )
    return WorkerNode(
        settings,
        chain,
        SimpleNamespace(address=ADDRESS),  # type: ignore[arg-type]
        Messenger(celery, MessageSigner(KEY, FAKE_DOMAIN)),
        runner,
        None,  # type: ignore[arg-type]
        workdir=tmp_path,
    )


def abort(node: WorkerNode, cause: ReplicateStatusCause, reason: str, key: str = OWNER_KEY) -> Any:
    """The scheduler's abort request, signed with ``key`` (the pool owner's by default)."""
    return node.abort(TASK, cause, reason, sign_abort(key, ADDRESS, TASK, str(cause), reason))


def reports(celery: FakeCelery) -> list[dict[str, Any]]:
    """The reports sent, out of their signed envelopes."""
    return [json.loads(m.args[0]["body"]) for m in celery.of(REPORT.name)]


def compute(node: WorkerNode) -> Any:
    """Run the job, then send what the node still holds (workers/reporting.py)."""
    try:
        return node._compute(TASK, DEAL, 0, 300, "0x" + "00" * 65, fast=False)
    finally:
        node.reporter.flush()


def task_dir(tmp_path: Path) -> Path:
    return tmp_path / ADDRESS / TASK


def assert_error_result(
    tmp_path: Path,
    celery: FakeCelery,
    status: ReplicateStatus,
    cause: ReplicateStatusCause,
    *,
    callback: bool = False,
) -> dict[str, Any]:
    last = reports(celery)[-1]
    assert last["status"] == status and last["cause"] == cause and last["note"] == "error result"
    state = json.loads((task_dir(tmp_path) / "state.json").read_text())
    assert state["errorResult"] == cause and "result_digest" not in last  # kept until the reveal
    last["digest"] = state["digest"]
    archive = zipfile.ZipFile(io.BytesIO(Path(state["zip"]).read_bytes()))
    assert sorted(archive.namelist()) == ["computed.json", "error.txt"]
    text = archive.read("error.txt").decode()
    assert f"[error:{status}, causes:[WorkflowError[cause={cause}, message=]]]" in text
    if not callback:
        assert state["digest"] == "0x" + hashlib.sha256(text.encode()).hexdigest()
    # the control process is asked to contribute it
    assert [m.args[0]["taskid"] for m in celery.of(CONTRIBUTE.name)] == [TASK]
    return last


def test_an_image_that_does_not_exist_ends_in_iexecs_error_result(tmp_path: Path) -> None:
    celery = FakeCelery()
    runner = RaisingRunner(AppImageError("manifest unknown"), at="image")
    outcome = compute(make_node(tmp_path, runner, celery, Chain()))
    report = assert_error_result(
        tmp_path, celery, R.APP_DOWNLOAD_FAILED, Cause.APP_IMAGE_DOWNLOAD_FAILED
    )
    assert report["digest"] == VECTORS[(R.APP_DOWNLOAD_FAILED, Cause.APP_IMAGE_DOWNLOAD_FAILED)]
    assert "manifest unknown" in report["reason"] and outcome.keep


@pytest.mark.parametrize(
    ("error", "at"),
    [
        (AppImageError("toomanyrequests: rate limit", node_fault=True), "image"),
        (EngineError("Docker Engine unreachable"), "image"),
        (EngineError("Docker Engine unreachable during wp-x"), "run"),
        (RuntimeError("a bug"), "run"),
    ],
)
def test_the_nodes_own_failures_are_aborted_for_another_node_and_cleaned_up(
    error: Exception, at: str, tmp_path: Path
) -> None:
    celery = FakeCelery()
    outcome = compute(make_node(tmp_path, RaisingRunner(error, at=at), celery, Chain()))
    last = reports(celery)[-1]
    assert last["status"] == R.ABORTED and last["node_fault"] is True
    assert str(error) in last["reason"] and outcome.status == R.ABORTED
    assert celery.of(CONTRIBUTE.name) == [] and not task_dir(tmp_path).exists()


def _app(write: bool, exit_code: int) -> Callable[[AppRun], RunOutcome]:
    def play(run: AppRun) -> RunOutcome:
        if write:
            default_fake_behaviour(run)
        return RunOutcome(exit_code=exit_code, stderr="boom\n", log_tail="boom\n")

    return play


def test_an_app_that_fails_after_writing_its_result_contributes_it(tmp_path: Path) -> None:
    celery = FakeCelery()
    compute(make_node(tmp_path, FakeRunner(_app(True, 1)), celery, Chain()))
    last = reports(celery)[-1]
    # iexec-worker v9.2: COMPUTED, and what computed.json says is contributed
    assert last["status"] == R.COMPUTED and last["cause"] == Cause.APP_COMPUTE_FAILED
    assert last["exit_code"] == 1 and last["reason"] == "app exited with code 1"
    result = (task_dir(tmp_path) / "iexec_out" / "result.txt").read_bytes()
    state = json.loads((task_dir(tmp_path) / "state.json").read_text())
    assert state["digest"] == "0x" + hashlib.sha256(result).hexdigest()
    assert not (task_dir(tmp_path) / "iexec_out" / "stderr.txt").exists()  # logs: success only
    assert celery.of(CONTRIBUTE.name)


def test_a_successful_run_keeps_its_output_for_the_requester(tmp_path: Path) -> None:
    celery = FakeCelery()
    compute(make_node(tmp_path, FakeRunner(), celery, Chain()))
    last = reports(celery)[-1]
    assert last["status"] == R.COMPUTED and "cause" not in last
    # the output goes to the requester's compute logs, not into the report's public log tail
    assert last["stdout"] == "fake app: done\n" and "log_tail" not in last


@pytest.mark.parametrize(
    ("exit_code", "cause"),
    [(1, Cause.APP_COMPUTE_FAILED), (0, Cause.POST_COMPUTE_COMPUTED_FILE_NOT_FOUND)],
)
def test_an_app_that_left_no_result_ends_in_an_error_result(
    exit_code: int, cause: ReplicateStatusCause, tmp_path: Path
) -> None:
    celery = FakeCelery()
    compute(make_node(tmp_path, FakeRunner(_app(False, exit_code)), celery, Chain()))
    last = assert_error_result(tmp_path, celery, R.COMPUTE_FAILED, cause)
    assert "computed.json" in last["reason"] and last["stderr"] == "boom\n"


def test_an_output_over_the_limit_is_never_contributed(tmp_path: Path) -> None:
    def play(run: AppRun) -> RunOutcome:
        default_fake_behaviour(run)
        return RunOutcome(exit_code=137, output_too_large=True, output_limit=MB)

    celery = FakeCelery()
    compute(make_node(tmp_path, FakeRunner(play), celery, Chain()))
    last = assert_error_result(tmp_path, celery, R.COMPUTE_FAILED, Cause.APP_COMPUTE_FAILED)
    assert "output exceeded the limit of 1 MB" in last["reason"]


def test_a_callback_deals_error_result_has_no_callback_data(tmp_path: Path) -> None:
    celery = FakeCelery()
    chain = Chain(callback="0x" + "cb" * 20)
    compute(make_node(tmp_path, FakeRunner(_app(False, 3)), celery, chain))
    last = assert_error_result(
        tmp_path, celery, R.COMPUTE_FAILED, Cause.APP_COMPUTE_FAILED, callback=True
    )
    assert last["digest"] == "0x" + keccak(b"").hex()
    state = json.loads((task_dir(tmp_path) / "state.json").read_text())
    assert state["callbackData"] == "" and state["callback"] == ""  # the zip is published


def test_unreachable_and_refused_inputs_end_in_error_results(
    servers: Callable[[], Server], tmp_path: Path
) -> None:
    server = servers()
    for url, why in (
        (server.url("/missing"), "HTTP 404"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
    ):
        celery = FakeCelery()
        params = json.dumps({"iexec_input_files": [url]})
        node = make_node(tmp_path, FakeRunner(), celery, Chain(params=params))
        if "169.254" not in url:
            node.download_policy = LOCAL
        compute(node)
        last = assert_error_result(
            tmp_path, celery, R.DATA_DOWNLOAD_FAILED, Cause.INPUT_FILES_DOWNLOAD_FAILED
        )
        assert why in last["reason"]
        assert (
            last["digest"] == VECTORS[(R.DATA_DOWNLOAD_FAILED, Cause.INPUT_FILES_DOWNLOAD_FAILED)]
        )
        node.purge(TASK)


def test_a_request_the_pool_refuses_ends_without_publishing_anything(tmp_path: Path) -> None:
    celery = FakeCelery()
    params = json.dumps({"iexec_args": 'unbalanced "quote'})
    compute(make_node(tmp_path, FakeRunner(), celery, Chain(params=params)))
    last = reports(celery)[-1]
    assert last["status"] == R.START_FAILED and last["cause"] == Cause.TASK_DESCRIPTION_INVALID
    assert celery.of(CONTRIBUTE.name) == [] and not task_dir(tmp_path).exists()


# ---- abort -------------------------------------------------------------------------------------
def test_an_abort_while_the_app_runs_stops_it_and_the_compute_side_stays_silent(
    tmp_path: Path,
) -> None:
    # Given a node whose app is running, and its control process (another node object on the
    # same work directory, as the control process is)
    compute_celery, control_celery = FakeCelery(), FakeCelery()
    control_runner = FakeRunner()
    control = make_node(tmp_path, control_runner, control_celery, Chain())

    def running(run: AppRun) -> RunOutcome:
        # When the scheduler's abort reaches the control process while the app runs
        abort(control, Cause.CONSENSUS_REACHED, "consensus was reached without it")
        default_fake_behaviour(run)
        return RunOutcome(exit_code=None, error="the container disappeared while running")

    node = make_node(tmp_path, FakeRunner(running), compute_celery, Chain())
    outcome = compute(node)
    # Then the control process stopped the container by its name and reported ABORTED
    assert control_runner.killed == [node.container_name(TASK)]
    (aborted,) = reports(control_celery)
    assert aborted["status"] == R.ABORTED and aborted["cause"] == Cause.CONSENSUS_REACHED
    # And the compute side reported nothing after COMPUTING, contributes nothing, and deleted
    # the task's folder
    assert [r["status"] for r in reports(compute_celery)][-1] == R.COMPUTING
    assert outcome.status == R.ABORTED and compute_celery.of(CONTRIBUTE.name) == []
    assert not task_dir(tmp_path).exists()


def test_an_abort_after_the_computation_deletes_the_result_and_nothing_is_contributed(
    tmp_path: Path,
) -> None:
    celery = FakeCelery()
    node = make_node(tmp_path, FakeRunner(), celery, Chain())
    compute(node)
    assert (task_dir(tmp_path) / "state.json").exists()
    abort(node, Cause.CONTRIBUTION_TIMEOUT, "the contribution deadline passed")
    assert [p.name for p in task_dir(tmp_path).iterdir()] == [ABORT_MARKER]
    assert reports(celery)[-1]["cause"] == Cause.CONTRIBUTION_TIMEOUT
    # the contribute request still queued finds nothing to send, and says nothing
    before = len(reports(celery))
    assert node.contribute(TASK).status == R.ABORTED
    assert len(reports(celery)) == before and not task_dir(tmp_path).exists()


def test_an_abort_before_the_job_starts_is_honoured_when_it_does(tmp_path: Path) -> None:
    celery = FakeCelery()
    node = make_node(tmp_path, FakeRunner(), celery, Chain())
    abort(node, Cause.CONSENSUS_REACHED, "not needed")
    assert (task_dir(tmp_path) / ABORT_MARKER).exists()
    outcome = compute(node)
    assert outcome.status == R.ABORTED and outcome.reason == "aborted before it started"
    assert [r["status"] for r in reports(celery)] == [R.ABORTED]  # the abort's report only
    assert not task_dir(tmp_path).exists()


def test_an_abort_not_signed_by_the_pool_owner_changes_nothing(tmp_path: Path) -> None:
    # Given a node whose app runs (a computed result waiting to be contributed)
    celery = FakeCelery()
    runner = FakeRunner()
    node = make_node(tmp_path, runner, celery, Chain())
    compute(node)
    sent = len(reports(celery))
    # When someone who can write to Redis sends an abort signed with another key, or none
    forged = abort(node, Cause.CONSENSUS_REACHED, "stop", key="0x" + "77" * 32)
    unsigned = node.abort(TASK, Cause.CONSENSUS_REACHED, "stop", "")
    # Then nothing is stopped, deleted or reported
    assert forged.status == unsigned.status == "DROPPED"
    assert "not by the workerpool owner" in forged.reason and "not a signature" in unsigned.reason
    assert runner.killed == [] and len(reports(celery)) == sent
    assert (task_dir(tmp_path) / "state.json").exists()
    assert not (task_dir(tmp_path) / ABORT_MARKER).exists()


def test_the_janitor_deletes_the_folders_no_longer_needed(tmp_path: Path) -> None:
    chain = Chain()
    node = make_node(tmp_path, FakeRunner(), FakeCelery(), chain)
    work = tmp_path / ADDRESS
    ids = {
        name: "0x" + f"{n:064x}"
        for n, name in enumerate(("done", "claimed", "late", "live", "busy"))
    }
    for taskid in ids.values():
        (work / taskid).mkdir()
        (work / taskid / "state.json").write_text("{}")
    chain.tasks[ids["done"]] = chain_task(ids["done"], ChainTaskStatus.COMPLETED)
    chain.tasks[ids["claimed"]] = chain_task(ids["claimed"], ChainTaskStatus.FAILED)
    chain.tasks[ids["late"]] = chain_task(
        ids["late"], ChainTaskStatus.REVEALING, final_deadline=chain.now
    )
    chain.tasks[ids["busy"]] = chain_task(ids["busy"], ChainTaskStatus.COMPLETED)
    # an abort's word for a job that never came, and one just left
    old, fresh = work / ("0x" + "f1" * 32), work / ("0x" + "f2" * 32)
    for marker in (old, fresh):
        marker.mkdir()
        (marker / ABORT_MARKER).write_text("{}")
    stamp = time.time() - ABORT_MARKER_TTL - 5
    os.utime(old, (stamp, stamp))
    with task_lock(work / ids["busy"]) as held:  # a computation holds this one
        assert held
        assert node.sweep() == 4
    assert sorted(p.name for p in work.iterdir()) == sorted([ids["live"], ids["busy"], fresh.name])


def test_an_unparsable_outcome_still_ends_in_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Post-compute errors that are not the iExec contract's (a tree no path can name) end
    in an error result, never in a silence that leaves the replicate COMPUTING."""

    def deep(run: AppRun) -> RunOutcome:
        default_fake_behaviour(run)
        return RunOutcome(exit_code=0)

    celery = FakeCelery()
    node = make_node(tmp_path, FakeRunner(deep), celery, Chain())
    original = results.package

    def broken(*args: Any, **kwargs: Any) -> Path:
        if "error_out" in str(args[0]):  # the error result itself is zipped as usual
            return original(*args, **kwargs)
        raise OSError(36, "File name too long")

    monkeypatch.setattr(results, "package", broken)
    compute(node)
    last = reports(celery)[-1]
    assert last["status"] == R.COMPUTE_FAILED
    assert last["cause"] == Cause.POST_COMPUTE_OUT_FOLDER_ZIP_FAILED
    assert "File name too long" in last["reason"]


def test_replicate_status_reports_carry_the_node_fault_flag() -> None:
    from pool.messages import ReplicateReport

    report = ReplicateReport(TASK, ADDRESS, R.ABORTED, node_fault=True)
    assert ReplicateReport.from_wire(report.to_wire()) == report
    assert dataclasses.replace(report, node_fault=False).to_wire()["node_fault"] is False
