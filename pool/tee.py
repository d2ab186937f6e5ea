"""The services around a TEE task, in iExec's API shapes, and the signatures they check.

* The **Secret Management Service** (SMS, iexec-sms): the scheduler asks it which framework it
  runs (``GET /tee/framework``) and, for each TEE task once initialized, the task's enclave
  challenge (``POST /tee/challenges/{taskid}``, signed by the pool owner); a worker node asks
  it the task's session (``POST /tee/sessions``, signed by the node) and stores its result
  proxy token there (``/secrets/web2``, iexec's web2 secrets).
* The **result proxy** (iexec-result-proxy): a node gets an upload token from it
  (``POST /v1/results/token``), the post-compute stage uploads the encrypted result through it
  (``POST /v1/results``), and the node reads the result's IPFS hash there
  (``GET /v1/results/{taskid}/ipfshash``) for the results link it contributes.

Every signature here is EIP-191 (``personal_sign``) over 32 bytes, as iexec's Java and Rust
code makes it (``signMessageHash``, alloy's ``sign_message_sync``):

* enclave challenge request: keccak256(taskid), by the pool owner;
* session and token requests: keccak256(worker ‖ taskid ‖ enclave), by the worker (the digest
  the scheduler's authorization signs, :func:`poco.proofs.authorization_digest`);
* a web2 secret: keccak256(keccak256("IEXEC_SMS_DOMAIN") ‖ owner ‖ keccak256(name) ‖
  keccak256(value)), by the owner; a web3 secret the same without the name;
* a stage's call to the node's enclave API: keccak256(taskid ‖ worker), by the enclave key;
* the enclave's signature of a result: keccak256(resultHash ‖ resultSeal), by the enclave key
  (:func:`poco.proofs.sign_enclave`, checked on chain by PoCo).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import requests
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_address, keccak, to_checksum_address

from poco.proofs import authorization_digest
from pool.messages import recover_signer
from pool.redact import redact_urls

SMS_DOMAIN = "IEXEC_SMS_DOMAIN"
# iexec-sms ReservedSecretKeyName
SECRET_RESULT_ENCRYPTION_KEY = "iexec-result-encryption-public-key"
SECRET_IPFS_TOKEN = "iexec-result-iexec-ipfs-token"
SECRET_RESULT_PROXY_URL = "iexec-result-iexec-result-proxy-url"
# the session's service names (iexec-sms TdxSessionMakerService)
PRE_COMPUTE, APP, POST_COMPUTE = "pre-compute", "app", "post-compute"
TIMEOUT = 10.0
# chains the devnet's TEE simulation serves (the devnet's anvil): its stand-ins refuse any other
DEVNET_CHAIN_IDS = (31337,)
MAX_ANSWER = 1 << 20  # bytes of an answer read from these services


def _raw(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


def personal_sign(private_key: str | bytes, digest: bytes) -> str:
    """EIP-191 signature over the 32 raw bytes ``digest``: 0x + r‖s‖v (v 27 or 28)."""
    signed = Account.sign_message(encode_defunct(primitive=digest), private_key)
    return "0x" + bytes(signed.signature).hex()


def personal_signer(digest: bytes, signature: str) -> str | None:
    """The address (lower case) that signed ``digest`` with EIP-191, or None."""
    try:
        raw = _raw(signature)
    except ValueError:
        return None
    prefixed = keccak(b"\x19Ethereum Signed Message:\n32" + digest)
    return recover_signer(prefixed, raw)


def challenge_request_digest(taskid: str) -> bytes:
    """What the pool owner signs to ask an enclave challenge (iexec-core's
    ``createAuthorization("", taskid, "")``: the empty worker and enclave add no bytes)."""
    return keccak(_raw(taskid))


def worker_request_digest(worker: str, taskid: str, enclave: str) -> bytes:
    """What a worker signs to ask a session or an upload token (``WorkerpoolAuthorization
    .getHash()``)."""
    return authorization_digest(worker, taskid, enclave)


def web2_secret_digest(owner: str, name: str, value: str) -> bytes:
    return keccak(
        keccak(text=SMS_DOMAIN)
        + _raw(to_checksum_address(owner))
        + keccak(text=name)
        + keccak(text=value)
    )


def web3_secret_digest(address: str, value: str) -> bytes:
    return keccak(keccak(text=SMS_DOMAIN) + _raw(to_checksum_address(address)) + keccak(text=value))


def enclave_call_digest(taskid: str, worker: str) -> bytes:
    """What a stage signs with the enclave key to call the node's enclave API."""
    return keccak(_raw(taskid) + _raw(to_checksum_address(worker)))


@dataclass(frozen=True)
class WorkerpoolAuthorization:
    """iexec's ``WorkerpoolAuthorization``: the scheduler's signature letting one worker
    contribute to one task with one enclave, as the SMS and the result proxy take it."""

    chain_task_id: str
    deal_id: str
    task_index: int
    worker_wallet: str
    enclave_challenge: str
    signature: str

    def to_json(self) -> dict[str, Any]:
        return {
            "chainTaskId": self.chain_task_id,
            "dealId": self.deal_id,
            "taskIndex": self.task_index,
            "workerWallet": to_checksum_address(self.worker_wallet),
            "enclaveChallenge": to_checksum_address(self.enclave_challenge),
            "signature": {"value": self.signature},
        }

    @classmethod
    def from_json(cls, data: Any) -> WorkerpoolAuthorization:
        """Read one (ValueError when it is not one)."""
        if not isinstance(data, dict):
            raise ValueError("a WorkerpoolAuthorization is a JSON object")
        signature = data.get("signature")
        value = signature.get("value") if isinstance(signature, dict) else signature
        fields = (data.get("chainTaskId"), data.get("dealId"), value)
        if not all(isinstance(f, str) and f.startswith("0x") for f in fields):
            raise ValueError("chainTaskId, dealId and signature must be hex strings")
        worker, enclave = data.get("workerWallet"), data.get("enclaveChallenge")
        if not is_address(worker) or not is_address(enclave):
            raise ValueError("workerWallet and enclaveChallenge must be addresses")
        index = data.get("taskIndex", 0)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError("taskIndex must be a non-negative integer")
        return cls(
            str(data["chainTaskId"]).lower(),
            str(data["dealId"]).lower(),
            index,
            str(worker),
            str(enclave),
            str(value),
        )


class TeeServiceError(Exception):
    """An SMS or result proxy that did not answer, or refused. ``error`` is the error name
    the SMS gave (a ``TeeSessionGenerationError``), when it gave one."""

    def __init__(self, message: str, *, status: int | None = None, error: str = "") -> None:
        super().__init__(redact_urls(message))
        self.status = status
        self.error = error


class _Service:
    name = "service"

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        self.http.trust_env = False

    def _call(
        self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kw: Any
    ) -> requests.Response:
        try:
            answer = self.http.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise TeeServiceError(f"{self.name} {self.url} unreachable: {exc}") from exc
        if answer.status_code not in ok:
            raise TeeServiceError(
                f"{self.name} {self.url} answered {method} {path.split('?')[0]} with "
                f"{answer.status_code} {answer.text[:200]!r}",
                status=answer.status_code,
                error=_error_name(answer),
            )
        if len(answer.content) > MAX_ANSWER:
            raise TeeServiceError(f"{self.name} {self.url}: answer larger than {MAX_ANSWER} bytes")
        return answer


def _error_name(answer: requests.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) and error.isidentifier() else ""


class SmsClient(_Service):
    """iexec-sms's API (the part a pool uses)."""

    name = "SMS"

    def framework(self) -> str:
        """The TEE framework this SMS runs (``"TDX"``, ``"SCONE"``, ``"GRAMINE"``)."""
        answer = self._call("GET", "/tee/framework")
        try:
            value = answer.json()
        except ValueError:
            value = answer.text.strip().strip('"')
        if not isinstance(value, str) or not value:
            raise TeeServiceError(f"SMS {self.url}: /tee/framework answered {answer.text[:80]!r}")
        return value.upper()

    def enclave_challenge(self, taskid: str, signature: str) -> str:
        """The task's enclave challenge (an address; the SMS keeps its key), asked with the
        pool owner's signature of :func:`challenge_request_digest`."""
        answer = self._call(
            "POST", f"/tee/challenges/{taskid}", headers={"authorization": signature}
        )
        value = answer.text.strip().strip('"')
        if not is_address(value) or int(value, 16) == 0:
            raise TeeServiceError(f"SMS {self.url}: challenge {value[:60]!r} is not an address")
        return to_checksum_address(value)

    def create_session(self, auth: WorkerpoolAuthorization, signature: str) -> tuple[str, str]:
        """(sessionId, secretProvisioningUrl) of a new session for ``auth``; a refusal raises
        TeeServiceError whose ``error`` is the SMS's TeeSessionGenerationError name."""
        answer = self._call(
            "POST", "/tee/sessions", headers={"Authorization": signature}, json=auth.to_json()
        )
        try:
            body = answer.json()
        except ValueError as exc:
            raise TeeServiceError(f"SMS {self.url}: session answer is not JSON") from exc
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise TeeServiceError(
                f"SMS {self.url}: no session ({error or 'no data'})",
                error=error if isinstance(error, str) else "",
            )
        session_id, url = data.get("sessionId"), data.get("secretProvisioningUrl")
        if not isinstance(session_id, str) or not session_id or not isinstance(url, str):
            raise TeeServiceError(f"SMS {self.url}: session answer lacks sessionId or URL")
        return session_id, url

    def web2_secret_exists(self, owner: str, name: str) -> bool:
        params = {"ownerAddress": to_checksum_address(owner), "secretName": name}
        answer = self._call("HEAD", "/secrets/web2", params=params, ok=(200, 204, 404))
        return answer.status_code != 404

    def set_web2_secret(self, private_key: str | bytes, owner: str, name: str, value: str) -> None:
        """Store (or replace) the web2 secret ``name`` of ``owner``, signed with its key (a
        POST that finds it created meanwhile, by a replicate beside this one, replaces it)."""
        signature = personal_sign(private_key, web2_secret_digest(owner, name, value))
        params = {"ownerAddress": to_checksum_address(owner), "secretName": name}
        headers = {"Authorization": signature, "Content-Type": "text/plain"}
        method = "PUT" if self.web2_secret_exists(owner, name) else "POST"
        answer = self._call(
            method,
            "/secrets/web2",
            params=params,
            data=value.encode(),
            headers=headers,
            ok=(200, 204, 409),
        )
        if answer.status_code == 409:
            self._call(
                "PUT", "/secrets/web2", params=params, data=value.encode(), headers=headers,
                ok=(200, 204),
            )  # fmt: skip


class ResultProxyClient(_Service):
    """iexec-result-proxy's API (the part a worker node uses)."""

    name = "result proxy"

    def token(self, auth: WorkerpoolAuthorization, signature: str) -> str:
        """An upload token for ``auth``'s worker, asked with its signature of
        :func:`worker_request_digest`."""
        answer = self._call(
            "POST", "/v1/results/token", headers={"Authorization": signature}, json=auth.to_json()
        )
        token = answer.text.strip()
        if not token or len(token) > 4096 or not token.isprintable():
            raise TeeServiceError(f"result proxy {self.url}: no usable token")
        return token

    def ipfs_hash(self, taskid: str) -> str:
        """The IPFS hash of the result uploaded for ``taskid``."""
        answer = self._call("GET", f"/v1/results/{taskid}/ipfshash")
        value = answer.text.strip().strip('"')
        if not value.isalnum() or not 10 <= len(value) <= 128:
            raise TeeServiceError(f"result proxy {self.url}: {value[:60]!r} is not an IPFS hash")
        return value


def session_json(text: str | bytes) -> dict[str, Any]:
    """A TDX session (``{name, version, services: [{name, image_name, fingerprint,
    environment}]}``), checked: ValueError when it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("services"), list):
        raise ValueError("a TDX session is a JSON object with a services list")
    for service in data["services"]:
        if not isinstance(service, dict) or not isinstance(service.get("name"), str):
            raise ValueError("each session service has a name")
        env = service.get("environment") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError(f"service {service['name']}: environment must map text to text")
        image = service.get("image_name", "")
        if not isinstance(image, str):
            raise ValueError(f"service {service['name']}: image_name must be text")
    return data
