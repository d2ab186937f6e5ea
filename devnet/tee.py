"""SIMULATION: stand-ins for iExec's TEE services on the devnet, one small Flask app.

What a TDX pool talks to, in the shapes read from iexec-sms and iexec-result-proxy, so that
the scheduler, the worker nodes and the iExec SDK run their real TDX code paths against the
devnet. Nothing here is an enclave and nothing is attested: every answer carries the header
``X-Workerpool-Simulation``, the stand-in refuses to start on any chain but the devnet's, and
the sessions it makes are marked for the devnet (the stage images of
:mod:`devnet.tee_stages` refuse any other).

The **SMS** (iexec-sms):

* ``GET /tee/framework`` → ``"TDX"``;
* ``POST /tee/challenges/{taskid}`` (header ``authorization``: the pool owner's EIP-191
  signature of keccak256(taskid); the task ACTIVE on chain, its deal a TEE deal) → the
  task's enclave challenge address (one key per task, the same on every call);
* ``POST /tee/sessions`` (header ``Authorization``: the worker's signature of keccak256(worker
  ‖ taskid ‖ enclave); body a ``WorkerpoolAuthorization`` signed by the pool owner) →
  ``{"data": {"sessionId", "secretProvisioningUrl"}}``, or ``{"error": <name>}`` with 401 or
  500 as iexec-sms answers (``INVALID_AUTHORIZATION``, ``EXECUTION_NOT_AUTHORIZED_*``,
  ``PRE_COMPUTE_GET_DATASET_SECRET_FAILED``, ``POST_COMPUTE_GET_*``). The session holds the
  three services (``pre-compute`` when the task has input files or a dataset, ``app``,
  ``post-compute``) with their images and environments as iexec-sms builds them for TDX;
* ``GET /simulation/provisioner/session/{sessionId}``: the session, once, over plain HTTP.
  In a real deployment a TDX guest gets it from the secret provider over attested TLS (the
  secret provider agent); this route is what stands in for that attestation;
* ``HEAD``/``POST``/``PUT /secrets/web2?ownerAddress=&secretName=`` (body the value, signed by
  the owner) and ``HEAD``/``POST /secrets/web3?secretAddress=`` (a dataset's key, signed by
  its owner): the beneficiary's result encryption key, the worker's result proxy token, the
  pool's result proxy URL, dataset keys.

The **result proxy** (iexec-result-proxy):

* ``POST /v1/results/token`` (a worker's signature and its WorkerpoolAuthorization) → a token
  (an HS256 JWT naming the worker);
* ``POST /v1/results`` (header ``Authorization``: that token; body ``{chainTaskId, zip,
  deterministHash, enclaveSignature}``) → the result is added to the devnet's IPFS node,
  once the enclave signature is the task's challenge's over that digest;
* ``GET /v1/results/{taskid}/ipfshash`` → its IPFS hash.

State is kept in memory: a restarted stand-in forgets its challenges and secrets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eth_account import Account
from eth_utils import is_address, keccak, to_checksum_address
from flask import Flask, Response, jsonify, request

from poco.chain import ChainClient
from poco.errors import PocoError
from poco.params import parse_deal_params
from poco.proofs import authorization_digest, result_hash, result_seal
from poco.tags import tee_framework
from poco.types import ChainTaskStatus, Deal
from pool.tee import (
    APP,
    DEVNET_CHAIN_IDS,
    POST_COMPUTE,
    PRE_COMPUTE,
    SECRET_IPFS_TOKEN,
    SECRET_RESULT_ENCRYPTION_KEY,
    SECRET_RESULT_PROXY_URL,
    WorkerpoolAuthorization,
    challenge_request_digest,
    personal_signer,
    web2_secret_digest,
    web3_secret_digest,
    worker_request_digest,
)
from workers.inputs import app_env, dataset_file_name, input_file_name
from workers.publishers import IpfsPublisher

log = logging.getLogger(__name__)

SIMULATION_HEADER = "X-Workerpool-Simulation"
SIMULATION_TEXT = "devnet stand-in: no enclave, no attestation"
# the images ops/apps/build makes from devnet/tee_stages.py
PRE_COMPUTE_IMAGE = "workerpool-tee-sim/pre-compute:1"
POST_COMPUTE_IMAGE = "workerpool-tee-sim/post-compute:1"
STAGE_MARK = "WORKERPOOL_TEE_SIMULATION_CHAIN_ID"
MAX_SECRET = 4096
MAX_RESULT = 100 * 1024 * 1024


class StandInRefused(RuntimeError):
    """The stand-in will not serve this chain."""


@dataclass
class Faults:
    """What the stand-in does wrong on purpose (tests): the framework it says it runs, a
    refusal of every challenge, an error for every session, variables left out of a stage's
    environment."""

    framework: str = "TDX"
    refuse_challenges: bool = False
    session_error: str = ""
    drop_env: dict[str, tuple[str, ...]] = field(default_factory=dict)


class TeeStandIn:
    """The state of the SMS and result proxy stand-ins."""

    def __init__(
        self,
        rpc_url: str,
        hub: str,
        ipfs_api_url: str,
        *,
        ipfs_gateway_url: str = "",
        pre_compute_image: str = PRE_COMPUTE_IMAGE,
        post_compute_image: str = POST_COMPUTE_IMAGE,
    ) -> None:
        self.client = ChainClient(rpc_url, hub)
        chain_id = self.client.chain_id
        if chain_id not in DEVNET_CHAIN_IDS:
            raise StandInRefused(
                f"the devnet's TEE stand-ins (a SIMULATION) serve the devnet only (chain "
                f"{', '.join(map(str, DEVNET_CHAIN_IDS))}); {rpc_url} is chain {chain_id}"
            )
        self.chain_id = chain_id
        self.ipfs = IpfsPublisher(ipfs_api_url)
        self.ipfs_gateway_url = ipfs_gateway_url
        self.images = {PRE_COMPUTE: pre_compute_image, POST_COMPUTE: post_compute_image}
        self.faults = Faults()
        self.task_faults: dict[str, Faults] = {}  # taskid -> faults of that task only
        self.jwt_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._challenges: dict[str, str] = {}  # taskid -> private key
        self._web2: dict[tuple[str, str], str] = {}
        self._web3: dict[str, str] = {}
        self._sessions: dict[str, dict[str, Any]] = {}
        self._authorizations: dict[str, WorkerpoolAuthorization] = {}
        self._results: dict[str, str] = {}  # taskid -> IPFS hash

    # ---- chain checks (iexec-sms AuthorizationService) ------------------------------------------
    def execution_problem(
        self, taskid: str, signed_by: Callable[[str], bool]
    ) -> tuple[str, Deal | None]:
        """iexec-sms's checks of a request on ``taskid``, in its order: the error name, or ""
        when the task is ACTIVE, its deal a TEE deal, and ``signed_by(pool owner)`` holds."""
        if not taskid:
            return "EMPTY_PARAMS_UNAUTHORIZED", None
        try:
            task = self.client.view_task(taskid)
        except (PocoError, ValueError):
            return "GET_CHAIN_TASK_FAILED", None
        if task.status != ChainTaskStatus.ACTIVE:
            return "TASK_NOT_ACTIVE", None
        try:
            deal = self.client.view_deal(task.dealid)
        except PocoError:
            return "GET_CHAIN_DEAL_FAILED", None
        if tee_framework(deal.tag) is None:
            return "NO_MATCH_ONCHAIN_TYPE", deal
        if not signed_by(deal.workerpool.owner.lower()):
            return "INVALID_SIGNATURE", deal
        return "", deal

    def authorization_problem(self, auth: WorkerpoolAuthorization) -> tuple[str, Deal | None]:
        """The checks of a WorkerpoolAuthorization: signed by the pool owner for its worker,
        task and enclave."""
        digest = authorization_digest(
            auth.worker_wallet, auth.chain_task_id, auth.enclave_challenge
        )
        return self.execution_problem(
            auth.chain_task_id, lambda owner: personal_signer(digest, auth.signature) == owner
        )

    def faults_for(self, taskid: str) -> Faults:
        return self.task_faults.get(taskid.lower(), self.faults)

    def challenge_key(self, taskid: str) -> str:
        with self._lock:
            key = self._challenges.get(taskid)
            if key is None:
                key = self._challenges[taskid] = "0x" + secrets.token_hex(32)
            return key

    # ---- sessions (iexec-sms SecretSessionBaseService, TdxSessionMakerService) ------------------
    def make_session(self, auth: WorkerpoolAuthorization, deal: Deal) -> dict[str, Any]:
        """The task's TDX session, or raise SessionError(name)."""
        taskid = auth.chain_task_id
        params = parse_deal_params(deal.params)
        key = self.challenge_key(taskid)
        sign_tokens = {
            "IEXEC_TASK_ID": taskid,
            "SIGN_WORKER_ADDRESS": to_checksum_address(auth.worker_wallet),
            "SIGN_TEE_CHALLENGE_PRIVATE_KEY": key,
            STAGE_MARK: str(self.chain_id),
            "WORKERPOOL_TEE_SIMULATION_IPFS_GATEWAY": self.ipfs_gateway_url,
        }
        index = auth.task_index
        has_dataset = int(deal.dataset.pointer, 16) != 0
        inputs = params.iexec_input_files
        services = []
        if has_dataset or inputs:
            pre = {
                "IEXEC_PRE_COMPUTE_OUT": "/iexec_in",
                "IS_DATASET_REQUIRED": "true" if has_dataset else "false",
                "IEXEC_DEAL_ID": deal.dealid,
                "IEXEC_TASK_INDEX": str(index),
                "IEXEC_TASK_ID": taskid,
                "IEXEC_INPUT_FILES_NUMBER": str(len(inputs)),
                **sign_tokens,
            }
            if inputs:
                pre["IEXEC_INPUT_FILES_FOLDER"] = "/iexec_in"
            for number, url in enumerate(inputs, start=1):
                pre[f"IEXEC_INPUT_FILE_URL_{number}"] = url
            if has_dataset:
                dataset = deal.dataset.pointer
                with self._lock:
                    secret = self._web3.get(dataset.lower())
                if not secret:
                    raise SessionError("PRE_COMPUTE_GET_DATASET_SECRET_FAILED")
                url, checksum = self._dataset(dataset)
                pre |= {
                    "IEXEC_DATASET_KEY": secret,
                    "IEXEC_DATASET_URL": url,
                    "IEXEC_DATASET_CHECKSUM": checksum,
                    "IEXEC_DATASET_FILENAME": dataset_file_name(dataset),
                }
            services.append(self._service(taskid, PRE_COMPUTE, self.images[PRE_COMPUTE], pre))
        app = app_env(
            deal_id=deal.dealid,
            task_id=taskid,
            task_index=index,
            bot_first=deal.bot_first,
            bot_size=deal.bot_size,
            input_file_names=[input_file_name(u) for u in inputs],
            dataset_address=deal.dataset.pointer if has_dataset else None,
        )
        app_image = self.client.app_multiaddr(deal.app.pointer).decode(errors="replace")
        services.append(self._service(taskid, APP, app_image, app))
        post = {**self._post_tokens(auth, deal, params), **sign_tokens}
        services.append(self._service(taskid, POST_COMPUTE, self.images[POST_COMPUTE], post))
        name = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(10))
        return {"name": f"{name}0000{taskid}", "version": "0.1.0", "services": services}

    def _service(
        self, taskid: str, name: str, image: str, environment: dict[str, str]
    ) -> dict[str, Any]:
        dropped = self.faults_for(taskid).drop_env.get(name, ())
        env = {k: v for k, v in environment.items() if k not in dropped}
        return {"name": name, "image_name": image, "fingerprint": "", "environment": env}

    def _dataset(self, dataset: str) -> tuple[str, str]:
        contract = self.client.contract("Dataset", dataset)
        url = bytes(contract.functions.m_datasetMultiaddr().call()).decode(errors="replace")
        checksum = "0x" + bytes(contract.functions.m_datasetChecksum().call()).hex()
        return url, checksum

    def _post_tokens(
        self, auth: WorkerpoolAuthorization, deal: Deal, params: Any
    ) -> dict[str, str]:
        tokens = {
            "RESULT_ENCRYPTION": "true" if params.iexec_result_encryption else "false",
            "RESULT_ENCRYPTION_PUBLIC_KEY": "",
            "RESULT_STORAGE_CALLBACK": "false",
            "RESULT_STORAGE_PROVIDER": "",
            "RESULT_STORAGE_PROXY": "",
            "RESULT_STORAGE_TOKEN": "",
        }
        if params.iexec_result_encryption:
            key = self.secret(deal.beneficiary, SECRET_RESULT_ENCRYPTION_KEY)
            if not key:
                raise SessionError(
                    "POST_COMPUTE_GET_ENCRYPTION_TOKENS_FAILED_EMPTY_BENEFICIARY_KEY"
                )
            tokens["RESULT_ENCRYPTION_PUBLIC_KEY"] = key
        if int(deal.callback, 16) != 0:
            tokens["RESULT_STORAGE_CALLBACK"] = "true"
            return tokens
        token = self.secret(auth.worker_wallet, SECRET_IPFS_TOKEN) or self.secret(
            deal.requester, SECRET_IPFS_TOKEN
        )
        if not token:
            raise SessionError("POST_COMPUTE_GET_STORAGE_TOKENS_FAILED")
        proxy = params.iexec_result_storage_proxy or self.secret(
            deal.workerpool.owner, SECRET_RESULT_PROXY_URL
        )
        tokens["RESULT_STORAGE_PROVIDER"] = params.iexec_result_storage_provider or "ipfs"
        tokens["RESULT_STORAGE_PROXY"] = proxy
        tokens["RESULT_STORAGE_TOKEN"] = token
        return tokens

    def store_session(self, session: dict[str, Any]) -> None:
        with self._lock:
            self._sessions[session["name"]] = session

    def take_session(self, session_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._sessions.pop(session_id, None)

    # ---- secrets -----------------------------------------------------------------------------
    def secret(self, owner: str, name: str) -> str:
        with self._lock:
            return self._web2.get((owner.lower(), name), "")

    def set_web2(self, owner: str, name: str, value: str, *, update: bool) -> int:
        with self._lock:
            exists = (owner.lower(), name) in self._web2
            if exists != update:
                return 404 if update else 409
            self._web2[(owner.lower(), name)] = value
        return 204

    def set_web3(self, address: str, value: str) -> int:
        with self._lock:
            if address.lower() in self._web3:
                return 409
            self._web3[address.lower()] = value
        return 204

    def web3_exists(self, address: str) -> bool:
        with self._lock:
            return address.lower() in self._web3

    # ---- result proxy ------------------------------------------------------------------------
    def jwt(self, worker: str) -> str:
        def part(data: dict[str, Any]) -> str:
            text = json.dumps(data, separators=(",", ":")).encode()
            return base64.urlsafe_b64encode(text).rstrip(b"=").decode()

        body = part({"alg": "HS256", "typ": "JWT"}) + "." + part({"walletAddress": worker.lower()})
        mac = hmac.new(self.jwt_key, body.encode(), hashlib.sha256).digest()
        return body + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def jwt_wallet(self, token: str) -> str:
        """The worker a token names, or "" when it is not one of ours."""
        body, _, mac = token.rpartition(".")
        expected = base64.urlsafe_b64encode(
            hmac.new(self.jwt_key, body.encode(), hashlib.sha256).digest()
        ).rstrip(b"=")
        if not body or not hmac.compare_digest(expected, mac.encode()):
            return ""
        payload = body.split(".")[-1]
        try:
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            return ""
        wallet = data.get("walletAddress") if isinstance(data, dict) else None
        return wallet if isinstance(wallet, str) else ""

    def remember(self, auth: WorkerpoolAuthorization) -> None:
        with self._lock:
            self._authorizations.setdefault(auth.chain_task_id, auth)

    def add_result(self, wallet: str, model: dict[str, Any]) -> tuple[int, str]:
        taskid = str(model.get("chainTaskId", "")).lower()
        with self._lock:
            auth = self._authorizations.get(taskid)
            done = taskid in self._results
        if auth is None or auth.worker_wallet.lower() != wallet or done:
            return 401, "no upload authorized for this worker and task"
        digest, signature = model.get("deterministHash"), model.get("enclaveSignature")
        if not isinstance(digest, str) or not isinstance(signature, str):
            return 400, "deterministHash and enclaveSignature are needed"
        try:
            message = keccak(
                bytes.fromhex(result_hash(taskid, digest)[2:])
                + bytes.fromhex(result_seal(wallet, taskid, digest)[2:])
            )
        except ValueError:
            return 400, "deterministHash is not a bytes32"
        if personal_signer(message, signature) != auth.enclave_challenge.lower():
            return 401, "the result is not signed by the task's enclave"
        data = _zip_bytes(model.get("zip"))
        if not data:
            return 400, "zip is empty or malformed"
        location = self.ipfs.publish(taskid, data)
        with self._lock:
            self._results[taskid] = location.removeprefix("/ipfs/")
        return 200, location

    def result_hash_of(self, taskid: str) -> str:
        with self._lock:
            return self._results.get(taskid.lower(), "")


class SessionError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _zip_bytes(value: Any) -> bytes:
    """The result bytes as Jackson reads a ``byte[]``: base64 text, or an array of bytes."""
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except ValueError:
            return b""
    elif isinstance(value, list) and all(isinstance(b, int) and -128 <= b <= 255 for b in value):
        data = bytes(b & 0xFF for b in value)
    else:
        return b""
    return data if len(data) <= MAX_RESULT else b""


def _auth_from(body: Any) -> WorkerpoolAuthorization | None:
    try:
        return WorkerpoolAuthorization.from_json(body)
    except ValueError:
        return None


def create_app(stand_in: TeeStandIn) -> Flask:
    """The stand-ins' routes (module docstring)."""
    app = Flask("workerpool-tee-stand-in")
    app.config["MAX_CONTENT_LENGTH"] = 2 * MAX_RESULT

    @app.after_request
    def label(response: Response) -> Response:
        response.headers[SIMULATION_HEADER] = SIMULATION_TEXT
        return response

    @app.get("/simulation")
    def about() -> Response:
        return jsonify(
            {
                "simulation": True,
                "what": SIMULATION_TEXT,
                "chainId": stand_in.chain_id,
                "framework": "TDX",
                "images": stand_in.images,
            }
        )

    # ---- SMS ----------------------------------------------------------------------------------
    @app.get("/tee/framework")
    def framework() -> Response:
        return jsonify(stand_in.faults.framework)

    @app.post("/tee/challenges/<taskid>")
    def challenge(taskid: str) -> Response | tuple[str, int]:
        taskid = taskid.lower()
        if stand_in.faults_for(taskid).refuse_challenges:
            return "", 404
        signature = request.headers.get("authorization", "")
        try:
            digest = challenge_request_digest(taskid)
        except ValueError:
            return "", 401
        problem, _ = stand_in.execution_problem(
            taskid, lambda owner: personal_signer(digest, signature) == owner
        )
        if problem:
            return "", 401
        key = stand_in.challenge_key(taskid)
        return Response(Account.from_key(key).address, mimetype="text/plain")

    @app.post("/tee/sessions")
    def session() -> tuple[Response, int]:
        auth = _auth_from(request.get_json(silent=True))
        signature = request.headers.get("Authorization", "")
        if (
            auth is None
            or personal_signer(
                worker_request_digest(
                    auth.worker_wallet, auth.chain_task_id, auth.enclave_challenge
                ),
                signature,
            )
            != auth.worker_wallet.lower()
        ):
            return jsonify({"data": None, "error": "INVALID_AUTHORIZATION"}), 401
        problem, deal = stand_in.authorization_problem(auth)
        if problem or deal is None:
            error = f"EXECUTION_NOT_AUTHORIZED_{problem or 'GET_CHAIN_DEAL_FAILED'}"
            return jsonify({"data": None, "error": error}), 401
        refusal = stand_in.faults_for(auth.chain_task_id).session_error
        if refusal:
            return jsonify({"data": None, "error": refusal}), 500
        try:
            made = stand_in.make_session(auth, deal)
        except SessionError as exc:
            return jsonify({"data": None, "error": exc.name}), 500
        stand_in.store_session(made)
        log.info("SIMULATION: session %s for task %s", made["name"], auth.chain_task_id)
        url = request.host_url.rstrip("/") + "/simulation/provisioner"
        return jsonify({"data": {"sessionId": made["name"], "secretProvisioningUrl": url}}), 200

    @app.get("/simulation/provisioner/session/<session_id>")
    def provision(session_id: str) -> Response | tuple[str, int]:
        made = stand_in.take_session(session_id)
        if made is None:
            return "", 404
        return jsonify(made)

    @app.route("/secrets/web2", methods=["HEAD", "POST", "PUT"])
    def web2() -> tuple[str, int]:
        owner = request.args.get("ownerAddress", "")
        name = request.args.get("secretName", "")
        if not is_address(owner) or not name:
            return "", 400
        if request.method == "HEAD":
            return "", 204 if stand_in.secret(owner, name) else 404
        value = request.get_data(as_text=True)
        if len(value) > MAX_SECRET:
            return "", 413
        signer = personal_signer(
            web2_secret_digest(owner, name, value), request.headers.get("Authorization", "")
        )
        if signer != owner.lower():
            return "", 401
        return "", stand_in.set_web2(owner, name, value, update=request.method == "PUT")

    @app.route("/secrets/web3", methods=["HEAD", "POST"])
    def web3() -> tuple[str, int]:
        address = request.args.get("secretAddress", "")
        if not is_address(address):
            return "", 400
        if request.method == "HEAD":
            return "", 204 if stand_in.web3_exists(address) else 404
        value = request.get_data(as_text=True)
        if len(value) > MAX_SECRET:
            return "", 413
        try:
            owner = stand_in.client.contract("Dataset", address).functions.owner().call()
        except Exception:  # not a dataset (or no such contract): nobody may set its key
            return "", 401
        signer = personal_signer(
            web3_secret_digest(address, value), request.headers.get("Authorization", "")
        )
        if signer != str(owner).lower():
            return "", 401
        return "", stand_in.set_web3(address, value)

    # ---- result proxy -------------------------------------------------------------------------
    @app.post("/v1/results/token")
    def token() -> Response | tuple[str, int]:
        auth = _auth_from(request.get_json(silent=True))
        signature = request.headers.get("Authorization", "")
        if (
            auth is None
            or personal_signer(
                worker_request_digest(
                    auth.worker_wallet, auth.chain_task_id, auth.enclave_challenge
                ),
                signature,
            )
            != auth.worker_wallet.lower()
        ):
            return "", 401
        problem, _ = stand_in.authorization_problem(auth)
        if problem:
            return "", 401
        stand_in.remember(auth)
        return Response(stand_in.jwt(auth.worker_wallet), mimetype="text/plain")

    @app.post("/v1/results")
    def add_result() -> tuple[str, int]:
        wallet = stand_in.jwt_wallet(request.headers.get("Authorization", ""))
        if not wallet:
            return "", 401
        model = request.get_json(silent=True)
        if not isinstance(model, dict):
            return "", 400
        status, text = stand_in.add_result(wallet, model)
        return text, status

    @app.get("/v1/results/<taskid>/ipfshash")
    def ipfs_hash(taskid: str) -> tuple[str, int]:
        found = stand_in.result_hash_of(taskid)
        return (found, 200) if found else ("", 404)

    return app
