"""SIMULATION: the pre- and post-compute stages of a TDX task, in software, for the devnet.

No enclave runs here and nothing is attested: the "enclave key" is the challenge key the
devnet's SMS stand-in (:mod:`devnet.tee`) puts in the session. Everything else is done as
iExec's stages do it (tee-worker-pre-compute / tee-worker-post-compute), in the same formats:

* **pre-compute** downloads the input files into ``IEXEC_PRE_COMPUTE_OUT`` (named ``0x`` +
  sha256 of the URL) and the dataset, checks its sha256 and decrypts it (AES-256-CBC, the IV
  first, PKCS#7, the key base64 in ``IEXEC_DATASET_KEY``);
* **post-compute** reads the app's ``/iexec_out/computed.json``, computes the result digest
  (sha256 of the deterministic file, keccak256 of the sha256 of a directory's entries, or
  keccak256 of the callback data), signs keccak256(resultHash ‖ resultSeal) with the enclave
  key (EIP-191), zips ``/iexec_out``, encrypts it for the beneficiary when asked (a fresh
  AES-256 key, ``iexec_out.zip.aes`` = IV ‖ AES-CBC(zip), ``aes-key.rsa`` = the key under the
  beneficiary's RSA key, PKCS#1 v1.5, both zipped), uploads it through the result proxy and
  posts the computed file to the node;
* a failure is posted to the node as ``[{"cause", "message"}]`` signed with the enclave key
  (exit 1); exit 2 when that fails, 3 without a task id.

Each stage refuses to run outside the devnet: the session must carry the devnet's chain id
(``WORKERPOOL_TEE_SIMULATION_CHAIN_ID``, put there by the stand-in, which itself serves the
devnet's chain only).

This file runs alone inside the stage images (``ops/apps/build tee-pre-compute
tee-post-compute``): the standard library, pycryptodome and coincurve only.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import coincurve
from Crypto.Cipher import AES, PKCS1_v1_5
from Crypto.Hash import keccak as _keccak
from Crypto.PublicKey import RSA
from Crypto.Util.Padding import pad, unpad

SIMULATION_MARK = "WORKERPOOL_TEE_SIMULATION_CHAIN_ID"
DEVNET_CHAIN_IDS = ("31337",)
BANNER = "SIMULATION: devnet TEE stage, no enclave, no attestation"
IEXEC_OUT = Path("/iexec_out")
MAX_DOWNLOAD = 100 * 1024 * 1024
RESULT_FILE_NAME_MAX = 31
TIMEOUT = 60


class Failure(Exception):
    def __init__(self, cause: str, message: str = "") -> None:
        super().__init__(f"{cause}: {message}")
        self.cause = cause
        self.message = message


class Failures(Failure):
    """Several causes at once (pre-compute reports every input that failed)."""

    def __init__(self, failures: list[Failure]) -> None:
        super().__init__(failures[0].cause, failures[0].message)
        self.all = failures


# ---- hashes and signatures ------------------------------------------------------------------
def keccak(data: bytes) -> bytes:
    return _keccak.new(digest_bits=256, data=data).digest()


def raw(value: str) -> bytes:
    """Hex text as bytes, as iexec's hexStringToByteArray reads it (an odd length reads its
    first digit alone)."""
    digits = value.removeprefix("0x")
    return bytes.fromhex("0" + digits if len(digits) % 2 else digits)


def concatenate_and_hash(*values: str) -> str:
    return "0x" + keccak(b"".join(raw(v) for v in values)).hex()


def sha256_hex(data: bytes) -> str:
    return "0x" + hashlib.sha256(data).hexdigest()


def sign(private_key: str, digest: str) -> str:
    """EIP-191 signature over the 32 bytes ``digest``: 0x + r‖s‖v, v 27 or 28."""
    prefixed = keccak(b"\x19Ethereum Signed Message:\n32" + raw(digest))
    sig = coincurve.PrivateKey(raw(private_key)).sign_recoverable(prefixed, hasher=None)
    return "0x" + sig[:64].hex() + f"{sig[64] + 27:02x}"


def env(name: str, cause: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise Failure(cause, f"{name} is not in the session")
    return value


# ---- talking to the node and the result proxy --------------------------------------------------
def node_url(path: str) -> str:
    host = os.environ.get("WORKER_HOST") or os.environ.get("WORKER_HOST_ENV_VAR") or "worker:13100"
    return f"http://{host}{path}"


def post(url: str, body: Any, authorization: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": authorization},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return answer.status, answer.read(1 << 20)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(2000)


def challenge(stage: str, task_id: str) -> str:
    """The enclave key's signature of keccak256(taskid ‖ worker): how the node knows a call
    comes from the task's enclave."""
    worker = env("SIGN_WORKER_ADDRESS", f"{stage}_WORKER_ADDRESS_MISSING")
    key = env("SIGN_TEE_CHALLENGE_PRIVATE_KEY", f"{stage}_TEE_CHALLENGE_PRIVATE_KEY_MISSING")
    return sign(key, concatenate_and_hash(task_id, worker))


def download(url: str) -> bytes:
    if url.startswith("/ipfs/"):
        gateway = os.environ.get("WORKERPOOL_TEE_SIMULATION_IPFS_GATEWAY", "")
        url = gateway.rstrip("/") + url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"cannot fetch {url[:100]!r}")
    with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
        data: bytes = answer.read(MAX_DOWNLOAD + 1)
    if len(data) > MAX_DOWNLOAD:
        raise ValueError(f"{url[:100]} is larger than {MAX_DOWNLOAD} bytes")
    return data


# ---- pre-compute -----------------------------------------------------------------------------
def pre_compute(task_id: str) -> None:
    out = Path(env("IEXEC_PRE_COMPUTE_OUT", "PRE_COMPUTE_OUTPUT_PATH_MISSING"))
    if not out.is_dir():
        raise Failure("PRE_COMPUTE_OUTPUT_FOLDER_NOT_FOUND", str(out))
    failures: list[Failure] = []
    required = os.environ.get("IS_DATASET_REQUIRED")
    if required is None:
        raise Failure("PRE_COMPUTE_IS_DATASET_REQUIRED_MISSING")
    if required.lower() == "true":
        try:
            fetch_dataset(out)
        except Failure as exc:
            failures.append(exc)
    number = os.environ.get("IEXEC_INPUT_FILES_NUMBER")
    if number is None or not number.isdigit():
        raise Failure("PRE_COMPUTE_INPUT_FILES_NUMBER_MISSING")
    for index in range(1, int(number) + 1):
        url = os.environ.get(f"IEXEC_INPUT_FILE_URL_{index}")
        if not url:
            failures.append(Failure("PRE_COMPUTE_AT_LEAST_ONE_INPUT_FILE_URL_MISSING", str(index)))
            continue
        try:
            (out / sha256_hex(url.encode())).write_bytes(download(url))
        except (OSError, ValueError) as exc:
            failures.append(Failure("PRE_COMPUTE_INPUT_FILE_DOWNLOAD_FAILED", f"{url}: {exc}"))
    if failures:
        raise Failures(failures)


def fetch_dataset(out: Path) -> None:
    url = env("IEXEC_DATASET_URL", "PRE_COMPUTE_DATASET_URL_MISSING")
    checksum = env("IEXEC_DATASET_CHECKSUM", "PRE_COMPUTE_DATASET_CHECKSUM_MISSING")
    name = env("IEXEC_DATASET_FILENAME", "PRE_COMPUTE_DATASET_FILENAME_MISSING")
    key = env("IEXEC_DATASET_KEY", "PRE_COMPUTE_DATASET_KEY_MISSING")
    try:
        encrypted = download(url)
    except (OSError, ValueError) as exc:
        raise Failure("PRE_COMPUTE_DATASET_DOWNLOAD_FAILED", f"{name}: {exc}") from exc
    if sha256_hex(encrypted) != checksum.lower():
        raise Failure("PRE_COMPUTE_INVALID_DATASET_CHECKSUM", name)
    try:
        aes_key = base64.b64decode(key, validate=True)
        cipher = AES.new(aes_key, AES.MODE_CBC, iv=encrypted[:16])
        plain = unpad(cipher.decrypt(encrypted[16:]), AES.block_size)
    except ValueError as exc:
        raise Failure("PRE_COMPUTE_DATASET_DECRYPTION_FAILED", f"{name}: {exc}") from exc
    if "/" in name or name in ("", ".", ".."):
        raise Failure("PRE_COMPUTE_SAVING_PLAIN_DATASET_FAILED", name)
    try:
        (out / name).write_bytes(plain)
    except OSError as exc:
        raise Failure("PRE_COMPUTE_SAVING_PLAIN_DATASET_FAILED", f"{name}: {exc}") from exc


# ---- post-compute ----------------------------------------------------------------------------
def post_compute(task_id: str) -> None:
    callback = env("RESULT_STORAGE_CALLBACK", "POST_COMPUTE_FAILED_UNKNOWN_ISSUE").lower()
    if callback not in ("true", "false"):
        raise Failure("POST_COMPUTE_FAILED_UNKNOWN_ISSUE", f"RESULT_STORAGE_CALLBACK={callback}")
    try:
        computed = json.loads((IEXEC_OUT / "computed.json").read_text())
        if not isinstance(computed, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise Failure("POST_COMPUTE_COMPUTED_FILE_NOT_FOUND", str(exc)) from exc
    computed["task-id"] = task_id
    digest = web3_digest(computed) if callback == "true" else web2_digest(computed)
    if not digest:
        raise Failure("POST_COMPUTE_RESULT_DIGEST_COMPUTATION_FAILED")
    computed["result-digest"] = digest
    worker = env("SIGN_WORKER_ADDRESS", "POST_COMPUTE_WORKER_ADDRESS_MISSING")
    key = env("SIGN_TEE_CHALLENGE_PRIVATE_KEY", "POST_COMPUTE_TEE_CHALLENGE_PRIVATE_KEY_MISSING")
    result_hash = concatenate_and_hash(task_id, digest)
    result_seal = concatenate_and_hash(worker, task_id, digest)
    computed["enclave-signature"] = sign(key, concatenate_and_hash(result_hash, result_seal))
    if callback == "false":
        upload(task_id, computed, encrypt_for_beneficiary(zip_iexec_out(task_id)))
    body = {
        name: computed.get(name)
        for name in (
            "deterministic-output-path",
            "callback-data",
            "task-id",
            "result-digest",
            "enclave-signature",
            "error-message",
        )
    }
    status, answer = post(
        node_url(f"/compute/post/{task_id}/computed"), body, challenge("POST_COMPUTE", task_id)
    )
    if status != 200:
        raise Failure("POST_COMPUTE_SEND_COMPUTED_FILE_FAILED", f"{status} {answer[:200]!r}")


def web3_digest(computed: dict[str, Any]) -> str:
    data = computed.get("callback-data")
    return concatenate_and_hash(data) if isinstance(data, str) and data else ""


def sha256_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return sha256_hex(data) if data else ""


def web2_digest(computed: dict[str, Any]) -> str:
    shown = computed.get("deterministic-output-path")
    if not isinstance(shown, str) or not shown:
        return ""
    path = Path(shown).resolve()
    if path != IEXEC_OUT.resolve() and IEXEC_OUT.resolve() not in path.parents:
        raise Failure("POST_COMPUTE_RESULT_DIGEST_COMPUTATION_FAILED", f"{shown} is outside")
    if not path.exists():
        return ""
    if not path.is_dir():
        return sha256_file(path)
    entries = sorted(path.iterdir())
    if not entries:
        return ""
    return concatenate_and_hash(*(sha256_file(e) for e in entries))


def zip_iexec_out(task_id: str) -> bytes:
    long = [p for p in IEXEC_OUT.rglob("*") if p.is_file() and len(p.name) > RESULT_FILE_NAME_MAX]
    if long:
        raise Failure("POST_COMPUTE_TOO_LONG_RESULT_FILE_NAME", long[0].name[:80])
    buffer = io.BytesIO()
    try:
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(IEXEC_OUT.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    archive.write(path, str(path.relative_to(IEXEC_OUT)))
    except OSError as exc:
        raise Failure("POST_COMPUTE_OUT_FOLDER_ZIP_FAILED", str(exc)) from exc
    return buffer.getvalue()


def encrypt_for_beneficiary(zipped: bytes) -> bytes:
    wanted = env("RESULT_ENCRYPTION", "POST_COMPUTE_FAILED_UNKNOWN_ISSUE").lower() == "true"
    if not wanted:
        return zipped
    encoded = env("RESULT_ENCRYPTION_PUBLIC_KEY", "POST_COMPUTE_ENCRYPTION_PUBLIC_KEY_MISSING")
    try:
        public = RSA.import_key(base64.b64decode(encoded, validate=True).decode())
    except (ValueError, IndexError, TypeError) as exc:
        raise Failure("POST_COMPUTE_MALFORMED_ENCRYPTION_PUBLIC_KEY", str(exc)) from exc
    aes_key, iv = secrets.token_bytes(32), secrets.token_bytes(16)
    try:
        encrypted = iv + AES.new(aes_key, AES.MODE_CBC, iv=iv).encrypt(pad(zipped, AES.block_size))
        wrapped = PKCS1_v1_5.new(public).encrypt(aes_key)
    except ValueError as exc:
        raise Failure("POST_COMPUTE_ENCRYPTION_FAILED", str(exc)) from exc
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("iexec_out.zip.aes", encrypted)
        archive.writestr("aes-key.rsa", wrapped)
    return buffer.getvalue()


def upload(task_id: str, computed: dict[str, Any], data: bytes) -> None:
    provider = os.environ.get("RESULT_STORAGE_PROVIDER", "")
    token = env("RESULT_STORAGE_TOKEN", "POST_COMPUTE_STORAGE_TOKEN_MISSING")
    if provider not in ("", "ipfs"):
        raise Failure("POST_COMPUTE_DROPBOX_UPLOAD_FAILED", f"{provider}: not in the simulation")
    proxy = env("RESULT_STORAGE_PROXY", "POST_COMPUTE_FAILED_UNKNOWN_ISSUE")
    model = {
        "chainTaskId": task_id,
        "dealId": "0x" + "00" * 32,
        "taskIndex": 0,
        "zip": base64.b64encode(data).decode(),
        "deterministHash": computed["result-digest"],
        "enclaveSignature": computed["enclave-signature"],
    }
    try:
        status, answer = post(proxy.rstrip("/") + "/v1/results", model, token)
    except OSError as exc:
        raise Failure("POST_COMPUTE_IPFS_UPLOAD_FAILED", str(exc)) from exc
    if status != 200:
        raise Failure("POST_COMPUTE_IPFS_UPLOAD_FAILED", f"{status} {answer[:200]!r}")


# ---- the stages' common run ------------------------------------------------------------------
def report(stage: str, task_id: str, failures: list[Failure]) -> int:
    """Post the causes to the node: exit 1 when it took them, 2 when it could not."""
    body = [{"cause": f.cause, "message": f.message[:500]} for f in failures]
    kind = "pre" if stage == "PRE_COMPUTE" else "post"
    try:
        status, _ = post(
            node_url(f"/compute/{kind}/{task_id}/exit-causes"), body, challenge(stage, task_id)
        )
    except (Failure, OSError) as exc:
        print(f"could not report {body}: {exc}", file=sys.stderr)
        return 2
    return 1 if status == 200 else 2


def main(argv: list[str]) -> int:
    stages = {"pre-compute": "PRE_COMPUTE", "post-compute": "POST_COMPUTE"}
    stage = stages.get(argv[1]) if len(argv) > 1 else None
    if stage is None:
        print("usage: tee_stages.py pre-compute|post-compute", file=sys.stderr)
        return 3
    print(f"{BANNER} ({stage.lower().replace('_', '-')})", flush=True)
    task_id = os.environ.get("IEXEC_TASK_ID", "")
    if not task_id:
        print("no IEXEC_TASK_ID in the session", file=sys.stderr)
        return 3
    try:
        if os.environ.get(SIMULATION_MARK) not in DEVNET_CHAIN_IDS:
            raise Failure(
                f"{stage}_FAILED_UNKNOWN_ISSUE",
                "this simulated stage runs for the devnet only, and its session names no devnet",
            )
        if stage == "PRE_COMPUTE":
            pre_compute(task_id)
        else:
            post_compute(task_id)
    except Failures as exc:
        return report(stage, task_id, exc.all)
    except Failure as exc:
        print(f"{stage}: {exc}", file=sys.stderr)
        return report(stage, task_id, [exc])
    except Exception as exc:  # anything unforeseen is still reported
        print(f"{stage}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return report(stage, task_id, [Failure(f"{stage}_FAILED_UNKNOWN_ISSUE", str(exc))])
    print(f"{stage.lower()}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
