"""TDX tasks on a worker node: the sequence iexec-worker runs for a TEE task, never a standard
run.

1. **Start** (STARTING): the node runs TDX (``WORKERPOOL_WORKER_TDX``, else
   TEE_NOT_SUPPORTED); the scheduler's authorization carries the task's enclave challenge; an
   SMS is known (else UNKNOWN_SMS). Without a callback, an upload token is asked from the
   result proxy and stored in the SMS as the node's web2 secret
   ``iexec-result-iexec-ipfs-token``. The SMS makes the task's session (``POST
   /tee/sessions``; a refusal is ``TEE_SESSION_GENERATION_<error>``), which the node then
   fetches: in a TDX guest through the secret provider agent (attested), in the devnet's
   simulation over plain HTTP. The session names the stage images, which must be the node's
   (``WORKERPOOL_TDX_PRE_COMPUTE_IMAGE`` / ``..._POST_COMPUTE_IMAGE``) and the app image,
   which must be the app's on chain (else GET_TEE_SERVICES_CONFIGURATION_FAILED).
2. **Images** (APP_DOWNLOADING): the app's, then the stages'.
3. **Compute** (COMPUTING): pre-compute when the session has one (input files, dataset),
   the app with the session's environment, then post-compute, which encrypts the result for
   the beneficiary, uploads it through the result proxy, signs it with the enclave key and
   posts the computed file to the node's enclave API (:mod:`workers.enclave_api`). A stage's
   exit code says what happened (0 done, 1 it reported its causes, 2 it could not report,
   3 it had no task id) and its reported causes (``PRE_COMPUTE_*``, ``POST_COMPUTE_*``) end
   the replicate COMPUTE_FAILED. Post-compute runs after a failed app too, as iexec-worker
   does: the enclave decides what the app's output is worth.
4. **Contribute** (the control process): the enclave's signature of the result must recover
   to the task's enclave challenge (else CONTRIBUTE_FAILED, ENCLAVE_SIGNATURE_NOT_FOUND: no
   transaction); the results link is the result proxy's IPFS hash (or the callback); then one
   ``contributeAndFinalize`` with the enclave challenge and its signature.

What is proven without TDX hardware and what is not: docs/tdx.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from eth_utils import keccak

from poco import actions
from poco.chain import ChainClient, Wallet
from poco.errors import TransactionReverted
from poco.orders import ZERO_ADDRESS
from poco.params import parse_deal_params
from poco.proofs import result_hash, result_seal
from poco.results import result_link
from poco.tags import is_tee, tee_framework
from poco.types import ChainTaskStatus, ContributionStatus, Deal
from pool.redact import redact_urls
from pool.settings import Settings, SettingsError
from pool.states import ReplicateStatus as R
from pool.states import ReplicateStatusCause as Cause
from pool.tee import (
    APP,
    DEVNET_CHAIN_IDS,
    POST_COMPUTE,
    PRE_COMPUTE,
    SECRET_IPFS_TOKEN,
    ResultProxyClient,
    SmsClient,
    TeeServiceError,
    WorkerpoolAuthorization,
    personal_sign,
    personal_signer,
    session_json,
    worker_request_digest,
)
from workers import inputs as inputs_mod
from workers.enclave_api import EnclaveApi
from workers.runner import AppImageError, AppRun, ContainerRunner, EngineError, RunOutcome

if TYPE_CHECKING:
    from workers.node import JobOutcome, WorkerNode

log = logging.getLogger(__name__)

MB = 1024 * 1024
TDX_GUEST_DEVICE = Path("/dev/tdx_guest")
TSM_REPORT = Path("/sys/kernel/config/tsm/report")
AGENT_TIMEOUT = 120.0
_KNOWN_CAUSES = frozenset(str(c) for c in Cause)
SIMULATION_BANNER = (
    "TDX SIMULATION: no enclave and no attestation; stage keys and results are visible on "
    "this host. For the devnet only."
)


def start_check(settings: Settings, chain_id: int) -> list[str]:
    """What this node checked on its host before it declares TDX, as lines to show at start;
    SettingsError when it cannot run TDX tasks as configured."""
    mode = settings.worker_tdx
    if mode == "off":
        return []
    missing = []
    if "://" not in settings.tdx_sms_url():
        missing.append("an SMS (WORKERPOOL_SMS_TDX_URL, or its scheduler's)")
    if not settings.result_proxy_url:
        missing.append("a result proxy (WORKERPOOL_RESULT_PROXY_URL, or its scheduler's)")
    if missing:
        raise SettingsError(f"WORKERPOOL_WORKER_TDX={mode} needs {' and '.join(missing)}")
    lines = [
        f"TDX: SMS {redact_urls(settings.tdx_sms_url())}, result proxy "
        f"{redact_urls(settings.result_proxy_url)}",
        f"TDX: stages {settings.tdx_pre_compute_image}, {settings.tdx_post_compute_image} "
        f"on the {settings.tdx_stage_network!r} network",
    ]
    if mode == "simulation":
        if chain_id not in DEVNET_CHAIN_IDS:
            raise SettingsError(
                f"WORKERPOOL_WORKER_TDX=simulation runs against the devnet only (chain "
                f"{', '.join(map(str, DEVNET_CHAIN_IDS))}); this chain is {chain_id}: use "
                "WORKERPOOL_WORKER_TDX=on in a TDX guest"
            )
        return [*lines, SIMULATION_BANNER, f"TDX: devnet chain {chain_id} checked"]
    device = TDX_GUEST_DEVICE
    if not (device.exists() and stat.S_ISCHR(device.stat().st_mode)):
        raise SettingsError(
            f"WORKERPOOL_WORKER_TDX=on, but {device} is missing: this host is not a TDX guest "
            "(the node must run in a TD with the tdx_guest driver loaded)"
        )
    agent = Path(settings.tdx_secret_provider_agent)
    if not (agent.is_file() and os.access(agent, os.X_OK)):
        raise SettingsError(
            f"WORKERPOOL_WORKER_TDX=on, but the secret provider agent {agent} is not an "
            "executable (WORKERPOOL_TDX_SECRET_PROVIDER_AGENT)"
        )
    tsm = "present" if TSM_REPORT.is_dir() else "absent"
    return [*lines, f"TDX: {device} present, configfs TSM reports {tsm}, agent {agent}"]


@dataclass
class StageResult:
    """How a stage ended: ``causes`` is empty when it succeeded."""

    causes: list[tuple[str, str]]
    outcome: RunOutcome | None = None

    @property
    def ok(self) -> bool:
        return not self.causes


class TdxRunner:
    """The TDX sequence of one node (``node.tee``); the enclave API runs in its compute
    process only (:meth:`start_api`)."""

    def __init__(
        self, settings: Settings, client: ChainClient, wallet: Wallet, runner: ContainerRunner
    ) -> None:
        self.settings = settings
        self.client = client
        self.wallet = wallet
        self.runner = runner
        self.api: EnclaveApi | None = None
        self.checks: list[str] = []  # what start_check saw on this host

    def start_api(self) -> EnclaveApi:
        bind = self.settings.worker_api_bind
        try:
            self.api = EnclaveApi(bind, self.wallet.address, self.chain_check)
        except OSError as exc:
            raise SettingsError(
                f"WORKERPOOL_WORKER_API_BIND={bind}: the enclave API cannot listen there "
                f"({exc}); each TDX node of a host needs its own port (0: any free port)"
            ) from exc
        self.api.start()
        return self.api

    def chain_check(self, taskid: str) -> str:
        """Why the enclave's computed file of ``taskid`` cannot be taken ("" when it can)."""
        task = self.client.view_task(taskid)
        if task.status != ChainTaskStatus.ACTIVE:
            return f"task is {task.status.name} on chain"
        if tee_framework(self.client.view_deal(task.dealid).tag) is None:
            return "not a TEE task"
        return ""

    # ---- start, images, compute (compute process) --------------------------------------------
    def compute(
        self,
        node: WorkerNode,
        taskid: str,
        deal: Deal,
        index: int,
        timeref: int,
        authorization: str,
        enclave: str,
    ) -> JobOutcome:
        """Run ``taskid`` of the TEE ``deal`` (STARTING already reported)."""
        framework = tee_framework(deal.tag) if is_tee(deal.tag) else None
        if framework != "tdx" or self.api is None:
            what = f"a {framework} task" if framework else "a TEE task naming no framework"
            return node._fail(
                taskid,
                R.START_FAILED,
                f"{what}: this node runs TDX tasks only (WORKERPOOL_WORKER_TDX), and a TEE "
                "task never as a standard one",
                cause=Cause.TEE_NOT_SUPPORTED,
            )
        if int(enclave, 16) == 0:
            return node._fail(
                taskid,
                R.START_FAILED,
                "the scheduler's authorization carries no enclave challenge",
                cause=Cause.WORKERPOOL_AUTHORIZATION_NOT_FOUND,
            )
        task_dir = node.workdir / taskid
        shutil.rmtree(task_dir, ignore_errors=True)
        in_dir, out_dir, scratch = task_dir / "iexec_in", task_dir / "iexec_out", task_dir / "empty"
        for folder in (in_dir, out_dir, scratch):
            folder.mkdir(parents=True)
        state: dict[str, Any] = {
            "tee": True,
            "authorization": authorization,
            "fastPath": True,
            "enclave": enclave,
        }
        _write_json(task_dir / "state.json", state)
        params = parse_deal_params(deal.params)
        try:
            args = inputs_mod.split_args(params.iexec_args)
        except inputs_mod.ArgsError as exc:
            return node._fail(
                taskid,
                R.START_FAILED,
                f"bad iexec_args: {exc}",
                cause=Cause.TASK_DESCRIPTION_INVALID,
            )
        callback = deal.callback if int(deal.callback, 16) != 0 else ""
        proxy = params.iexec_result_storage_proxy or self.settings.result_proxy_url
        sms_url = self.settings.tdx_sms_url()
        if not sms_url:
            return node._fail(
                taskid, R.START_FAILED, "no SMS for TDX tasks", cause=Cause.UNKNOWN_SMS
            )
        sms = SmsClient(sms_url)
        auth = WorkerpoolAuthorization(
            taskid, deal.dealid, index, self.wallet.address, enclave, authorization
        )
        signature = personal_sign(
            self.wallet.account.key, worker_request_digest(self.wallet.address, taskid, enclave)
        )
        if not callback:
            try:
                token = ResultProxyClient(proxy).token(auth, signature)
                sms.set_web2_secret(
                    self.wallet.account.key, self.wallet.address, SECRET_IPFS_TOKEN, token
                )
            except TeeServiceError as exc:
                return node._fail(
                    taskid,
                    R.START_FAILED,
                    f"no result upload token stored for the enclave: {exc}",
                    cause=Cause.TEE_SESSION_GENERATION_POST_COMPUTE_GET_STORAGE_TOKENS_FAILED,
                )
        try:
            session_id, provisioning = sms.create_session(auth, signature)
        except TeeServiceError as exc:
            name = f"TEE_SESSION_GENERATION_{exc.error}"
            cause = (
                Cause(name) if name in _KNOWN_CAUSES else Cause.TEE_SESSION_GENERATION_UNKNOWN_ISSUE
            )
            return node._fail(taskid, R.START_FAILED, f"no TEE session: {exc}", cause=cause)
        try:
            session = self._fetch_session(task_dir, taskid, provisioning, session_id)
        except (OSError, ValueError, subprocess.SubprocessError, requests.RequestException) as exc:
            return node._fail(
                taskid,
                R.START_FAILED,
                f"the TEE session could not be fetched: {exc}",
                cause=Cause.TEE_SESSION_GENERATION_SECURE_SESSION_STORAGE_CALL_FAILED,
            )
        services = {s["name"]: s for s in session["services"]}
        app_image = self.client.app_multiaddr(deal.app.pointer).decode(errors="replace")
        problem = self._session_problem(services, app_image)
        if problem:
            return node._fail(
                taskid, R.START_FAILED, problem, cause=Cause.GET_TEE_SERVICES_CONFIGURATION_FAILED
            )

        node.report(taskid, R.APP_DOWNLOADING)
        try:
            self.runner.ensure_image(app_image)
        except AppImageError as exc:
            return node._fail(
                taskid,
                R.APP_DOWNLOAD_FAILED,
                f"app image: {exc}",
                cause=Cause.APP_IMAGE_DOWNLOAD_FAILED,
            )

        node.report(taskid, R.COMPUTING)
        computed_path = task_dir / "tee-computed.json"
        self.api.expect(taskid, enclave, computed_path)
        base = _Run(node, taskid, deal, index, timeref)
        try:
            outcome = self._stages(base, services, args, app_image, in_dir, out_dir, scratch)
        except EngineError as exc:
            return node._fail(
                taskid, R.ABORTED, f"container engine failure: {exc}", cause=Cause.ABORTED_BY_WORKER
            )
        finally:
            self.api.forget(taskid)
        app_outcome, last = outcome
        if app_outcome is None:  # pre-compute failed: nothing else ran
            return self._compute_failed(node, taskid, None, last.causes)
        if not last.ok or not computed_path.exists():
            causes = last.causes or [
                (str(Cause.POST_COMPUTE_COMPUTED_FILE_NOT_FOUND), "no computed file was posted")
            ]
            return self._compute_failed(node, taskid, app_outcome, causes)
        computed = json.loads(computed_path.read_text())
        state.update(
            digest=computed["result-digest"],
            enclaveSignature=computed["enclave-signature"],
            callbackData=computed.get("callback-data") or "",
            callback=callback,
            resultProxy=proxy,
            storage=params.iexec_result_storage_provider or "ipfs",
        )
        _write_json(task_dir / "state.json", state)
        node.report(
            taskid,
            R.COMPUTED,
            duration=app_outcome.duration,
            exit_code=app_outcome.exit_code,
            stdout=app_outcome.stdout or None,
            stderr=app_outcome.stderr or None,
        )
        node.messages.contribute(node.address, taskid)
        from workers.node import JobOutcome

        # the folder holds the enclave's computed file for the contribution to come
        return JobOutcome(taskid, str(R.COMPUTED), keep=True)

    def _fetch_session(
        self, task_dir: Path, taskid: str, provisioning: str, session_id: str
    ) -> dict[str, Any]:
        """The task's session, from the secret provider: attested through the agent in a TDX
        guest; in the simulation, a plain HTTP GET of the stand-in (nothing attested)."""
        if self.settings.worker_tdx == "simulation":
            log.warning("task %s: %s", taskid, SIMULATION_BANNER)
            answer = requests.get(f"{provisioning.rstrip('/')}/session/{session_id}", timeout=10)
            answer.raise_for_status()
            return session_json(answer.content)
        name = f"session-{taskid}.json"
        proc = subprocess.run(
            [
                self.settings.tdx_secret_provider_agent,
                "-e",
                provisioning,
                "-i",
                session_id,
                "-s",
                name,
                "-v",
                "nullverifier",
            ],
            cwd=task_dir,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT,
            check=False,
        )
        for line in (proc.stdout + proc.stderr).splitlines()[-20:]:
            log.info("secret_provider_agent: %s", line)
        path = task_dir / name
        try:
            return session_json(path.read_bytes())
        finally:
            path.unlink(missing_ok=True)  # it holds the enclave key: not kept on disk

    def _session_problem(self, services: dict[str, Any], app_image: str) -> str:
        expected = {
            PRE_COMPUTE: self.settings.tdx_pre_compute_image,
            POST_COMPUTE: self.settings.tdx_post_compute_image,
        }
        if POST_COMPUTE not in services or APP not in services:
            return f"the TEE session has no {APP} or {POST_COMPUTE} service"
        for name, image in expected.items():
            named = services.get(name, {}).get("image_name", image) or image
            if name in services and named != image:
                setting = f"WORKERPOOL_TDX_{name.upper().replace('-', '_')}_IMAGE"
                return (
                    f"the SMS names {named} as the {name} image, this node runs {image} ({setting})"
                )
        named_app = services[APP].get("image_name") or app_image
        if named_app != app_image:
            return f"the session names app image {named_app}, the app on chain is {app_image}"
        return ""

    def _stages(
        self,
        base: _Run,
        services: dict[str, Any],
        args: list[str],
        app_image: str,
        in_dir: Path,
        out_dir: Path,
        scratch: Path,
    ) -> tuple[RunOutcome | None, StageResult]:
        """Pre-compute, app, post-compute: (the app's outcome, post-compute's result), or
        (None, pre-compute's result) when pre-compute failed (nothing else runs then)."""
        assert self.api is not None
        node_env = {"WORKER_HOST": self.api.address, "WORKER_HOST_ENV_VAR": self.api.address}
        if PRE_COMPUTE in services:
            pre = self._stage(
                base, "pre", self.settings.tdx_pre_compute_image, services[PRE_COMPUTE],
                node_env, input_dir=in_dir, output_dir=scratch, input_writable=True,
            )  # fmt: skip
            if not pre.ok:
                return None, pre
        app = base.app_run(
            app_image, args, dict(services[APP].get("environment") or {}), in_dir, out_dir
        )
        app_outcome = self.runner.run(app)
        if not app_outcome.ok:
            log.warning("task %s: app: %s", base.taskid, app_outcome.reason())
        post = self._stage(
            base, "post", self.settings.tdx_post_compute_image, services[POST_COMPUTE],
            node_env, input_dir=scratch, output_dir=out_dir, input_writable=False,
        )  # fmt: skip
        return app_outcome, post

    def _stage(
        self,
        base: _Run,
        stage: str,
        image: str,
        service: dict[str, Any],
        node_env: dict[str, str],
        *,
        input_dir: Path,
        output_dir: Path,
        input_writable: bool,
    ) -> StageResult:
        prefix = f"{stage.upper()}_COMPUTE"
        try:
            self.runner.ensure_image(image)
        except AppImageError as exc:
            return StageResult([(f"{prefix}_IMAGE_MISSING", str(exc))])
        run = base.stage_run(
            stage, image, {**(service.get("environment") or {}), **node_env}, input_dir, output_dir
        )
        run.input_writable = input_writable
        run.network_mode = self.settings.tdx_stage_network
        outcome = self.runner.run(run)
        if outcome.timed_out:
            return StageResult([(f"{prefix}_TIMEOUT", outcome.reason())], outcome)
        code = outcome.exit_code
        if code == 0 and outcome.ok:
            return StageResult([], outcome)
        assert self.api is not None
        reported = self.api.exit_causes(base.taskid, stage)
        if code == 1:
            causes = reported or [(f"{prefix}_FAILED_UNKNOWN_ISSUE", "it reported no cause")]
        elif code == 2:
            causes = [(f"{prefix}_EXIT_REPORTING_FAILED", "it could not report its causes")]
        elif code == 3:
            causes = [(f"{prefix}_TASK_ID_MISSING", "it found no task id in its session")]
        else:
            causes = [(f"{prefix}_FAILED_UNKNOWN_ISSUE", outcome.reason())]
        tail = outcome.log_tail.strip().splitlines()[-3:]
        log.warning("task %s: %s-compute failed %s %s", base.taskid, stage, causes, tail)
        return StageResult(causes, outcome)

    def _compute_failed(
        self,
        node: WorkerNode,
        taskid: str,
        app: RunOutcome | None,
        causes: list[tuple[str, str]],
    ) -> JobOutcome:
        """COMPUTE_FAILED with the stage's first cause; the app's own failure first when it
        failed (its output is what post-compute could not take)."""
        text = "; ".join(f"{c}: {m}" if m else c for c, m in causes)
        cause = Cause(causes[0][0]) if causes[0][0] in _KNOWN_CAUSES else Cause.UNKNOWN
        if app is not None and not app.ok:
            text = f"app: {app.reason()}; then post-compute: {text}"
            cause = Cause.APP_COMPUTE_TIMEOUT if app.timed_out else Cause.APP_COMPUTE_FAILED
        from workers.node import JobOutcome

        log.warning("task %s: %s: %s", taskid, R.COMPUTE_FAILED, text)
        text = redact_urls(text)[:2000]  # an RPC URL in an error text may hold an API key
        node.report(
            taskid,
            R.COMPUTE_FAILED,
            reason=text,
            cause=cause,
            log_tail=app.log_tail if app else None,
            exit_code=app.exit_code if app else None,
            stdout=app.stdout or None if app else None,
            stderr=app.stderr or None if app else None,
        )
        return JobOutcome(taskid, str(R.COMPUTE_FAILED), text)


# ---- the node's hooks ----------------------------------------------------------------------
def compute(
    node: WorkerNode,
    taskid: str,
    deal: Deal,
    index: int,
    timeref: int,
    authorization: str,
    enclave: str,
) -> JobOutcome:
    """Run a TEE task on ``node`` (compute process): its TDX sequence, or refused
    (TEE_NOT_SUPPORTED) on a node that runs none. Never a standard run."""
    if node.tee is None:
        return node._fail(
            taskid,
            R.START_FAILED,
            "this node runs no TEE task (WORKERPOOL_WORKER_TDX=off): a TEE task never runs "
            "as a standard one",
            cause=Cause.TEE_NOT_SUPPORTED,
        )
    return node.tee.compute(node, taskid, deal, index, timeref, authorization, enclave)


def contribute(node: WorkerNode, taskid: str, state: dict[str, Any]) -> JobOutcome:
    """contributeAndFinalize with the enclave challenge and its signature, once that
    signature is checked; nothing is sent without one."""
    from workers.node import JobOutcome

    digest, enclave = state.get("digest", ""), state.get("enclave", ZERO_ADDRESS)
    signature = state.get("enclaveSignature", "")
    problem = enclave_signature_problem(node.address, taskid, digest, enclave, signature)
    if problem:
        return node._fail(
            taskid, R.CONTRIBUTE_FAILED, problem, cause=Cause.ENCLAVE_SIGNATURE_NOT_FOUND
        )
    gas = node.gas()
    if gas.empty:
        return node._fail(taskid, R.CONTRIBUTE_FAILED, gas.describe(node.address))
    node.report(taskid, R.CONTRIBUTING, note="contributeAndFinalize")
    callback_data = str(state.get("callbackData") or "")
    try:
        if state.get("callback"):
            link = result_link("ethereum", state["callback"])
            results_callback = _callback_bytes(callback_data)
        elif state.get("storage") == "dropbox":  # uploaded there by post-compute
            link = result_link("dropbox", f"/results/{taskid}")
            results_callback = b""
        else:
            proxy = ResultProxyClient(str(state.get("resultProxy") or ""))
            link = result_link("ipfs", "/ipfs/" + proxy.ipfs_hash(taskid))
            results_callback = b""
    except (TeeServiceError, ValueError) as exc:
        return node._fail(
            taskid, R.CONTRIBUTE_FAILED, f"no results link: {exc}", cause=Cause.RESULT_LINK_MISSING
        )
    try:
        receipt = actions.contribute_and_finalize(
            node.wallet,
            taskid,
            digest,
            link.encode(),
            state["authorization"],
            results_callback,
            enclave,
            signature,
        )
    except TransactionReverted as exc:
        if node._on_chain(taskid) != ContributionStatus.PROVED:
            return node._fail(
                taskid, R.CONTRIBUTE_FAILED, str(exc), cause=Cause.CHAIN_RECEIPT_NOT_VALID
            )
        receipt = None  # sent twice: it is done
    node.report(
        taskid,
        R.COMPLETED,
        tx_hash=receipt.tx_hash if receipt else None,
        result_link=link,
        callback_data=callback_data or None,
        finalized=True,
    )
    return JobOutcome(taskid, str(R.COMPLETED))


def enclave_signature_problem(
    worker: str, taskid: str, digest: str, enclave: str, signature: str
) -> str:
    """Why ``signature`` is not the enclave's over this result ("" when it is): PoCo checks
    EIP-191 of keccak256(resultHash ‖ resultSeal) against the enclave challenge."""
    if not digest or not signature or int(enclave or "0", 16) == 0:
        return "no enclave signature for this result"
    message = keccak(
        bytes.fromhex(result_hash(taskid, digest)[2:])
        + bytes.fromhex(result_seal(worker, taskid, digest)[2:])
    )
    signer = personal_signer(message, signature)
    if signer != enclave.lower():
        return f"the enclave signature recovers to {signer}, not the task's enclave {enclave}"
    return ""


def _callback_bytes(callback_data: str) -> bytes:
    digits = callback_data.removeprefix("0x")
    if not digits:
        raise ValueError("callback deal, but the enclave gave no callback-data")
    return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)


class _Run:
    """What the containers of one TEE replicate share (names, labels, limits)."""

    def __init__(self, node: WorkerNode, taskid: str, deal: Deal, index: int, timeref: int):
        from workers.node import BROKER_LABEL, WORKER_LABEL

        settings = node.settings
        self.taskid = taskid
        self.deal = deal
        self.index = index
        self.timeout = float(
            min(timeref, settings.app_max_runtime) if settings.app_max_runtime else timeref
        )
        self.memory = settings.app_memory_mb * MB
        self.cpus = int(settings.app_cpus * 1e9)
        self.output_limit = settings.app_output_limit_mb * MB
        self.network = settings.app_network
        self.name = f"wp-{node.address[2:10].lower()}-{taskid[2:18]}"
        self.labels = {WORKER_LABEL: node.address.lower(), BROKER_LABEL: node.broker_id}

    def _run(
        self, name: str, image: str, args: list[str], env: dict[str, str], inp: Path, out: Path
    ) -> AppRun:
        return AppRun(
            task_id=self.taskid,
            deal_id=self.deal.dealid,
            task_index=self.index,
            bot_first=self.deal.bot_first,
            bot_size=self.deal.bot_size,
            image=image,
            args=args,
            input_dir=inp,
            output_dir=out,
            env=env,
            timeout=self.timeout,
            memory_bytes=self.memory,
            nano_cpus=self.cpus,
            output_limit_bytes=self.output_limit,
            network=self.network,
            name=name,
            labels=self.labels,
        )

    def app_run(
        self, image: str, args: list[str], env: dict[str, str], inp: Path, out: Path
    ) -> AppRun:
        return self._run(self.name, image, args, env, inp, out)

    def stage_run(
        self, stage: str, image: str, env: dict[str, str], inp: Path, out: Path
    ) -> AppRun:
        return self._run(f"{self.name}-{stage}", image, [], env, inp, out)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
