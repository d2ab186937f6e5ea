"""TEE tasks on the scheduler's side, as iexec-core's ``SmsService`` handles them.

* Before a TEE task is initialized, the SMS of its framework must say it runs that framework
  (``GET /tee/framework``); an SMS that runs another one fails the task (INITIALIZE_FAILED,
  no transaction sent, as iexec-core does); an SMS that does not answer keeps the task
  waiting (RECEIVED, with the reason) until it does.
* Once the task is initialized on chain, its enclave challenge is asked from the SMS
  (``POST /tee/challenges/{taskid}``, signed by the pool owner) and stored on the task: the
  authorization of a TEE task carries that challenge, never one a worker proposes. An SMS
  that does not answer keeps the task waiting (INITIALIZED, with the reason) and is asked
  again; iexec-core fails the task at once instead, and its requester then waits for the final
  deadline all the same.
* With the first challenge of each SMS, the pool's result proxy URL is stored there as the
  pool owner's web2 secret ``iexec-result-iexec-result-proxy-url`` (the SMS gives it to the
  post-compute stage when a deal names no proxy).

Only TDX runs here (WORKERPOOL_TEE_STACK=tdx, with WORKERPOOL_SMS_TDX_URL and
WORKERPOOL_RESULT_PROXY_URL).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from poco.chain import Wallet
from poco.tags import is_tee, tee_framework
from pool.redact import redact_urls
from pool.settings import Settings
from pool.tee import (
    SECRET_RESULT_PROXY_URL,
    SmsClient,
    TeeServiceError,
    challenge_request_digest,
    personal_sign,
)

log = logging.getLogger(__name__)

# an SMS's answer to GET /tee/framework is believed this long (one call per tick at most)
FRAMEWORK_TTL = 30.0
# an SMS that failed is asked again after this long (a tick does not wait on it for every task)
RETRY_AFTER = 5.0
# the enum names iexec-sms answers (TeeFramework)
SMS_FRAMEWORK = {"scone": "SCONE", "gramine": "GRAMINE", "tdx": "TDX"}


class TeeTasks:
    """The SMS calls of TEE tasks, shared by the scheduler's parts (one per process)."""

    def __init__(self, settings: Settings, wallet: Wallet) -> None:
        self.settings = settings
        self.wallet = wallet
        self._clients: dict[str, SmsClient] = {}
        self._frameworks: dict[str, tuple[float, str]] = {}  # url -> (when, framework)
        self._failing: dict[str, tuple[float, str]] = {}  # url -> (until, why)
        self._proxy_stored: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def framework(tag: Any) -> str | None:
        """The TEE framework a task's tag asks for, None for a standard task."""
        return tee_framework(tag) if tag is not None and is_tee(tag) else None

    def sms_url(self, framework: str) -> str:
        """The SMS of ``framework`` ("" when the pool runs no such TEE task)."""
        if framework == "tdx" and "tdx" in self.settings.tee_stack:
            return self.settings.tdx_sms_url()
        return ""

    def _client(self, url: str) -> SmsClient:
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = SmsClient(url, timeout=5.0)
            return client

    def _down(self, url: str) -> str:
        """Why ``url`` is not asked now (it failed a moment ago), or ""."""
        failing = self._failing.get(url)
        if failing is not None and time.monotonic() < failing[0]:
            return failing[1]
        return ""

    def _failed(self, url: str, why: str) -> None:
        self._failing[url] = (time.monotonic() + RETRY_AFTER, why)

    def runs(self, framework: str) -> tuple[bool | None, str]:
        """Whether the SMS of ``framework`` runs it: (True, url), (False, why: it runs
        another framework, or the pool has none for it) or (None, why: no answer now)."""
        url = self.sms_url(framework)
        if not url:
            return False, f"this pool has no SMS for {framework} (WORKERPOOL_TEE_STACK)"
        cached = self._frameworks.get(url)
        if cached is None or time.monotonic() - cached[0] > FRAMEWORK_TTL:
            down = self._down(url)
            if down:
                return None, down
            try:
                answer = self._client(url).framework()
            except TeeServiceError as exc:
                self._failed(url, str(exc))
                return None, str(exc)
            cached = self._frameworks[url] = (time.monotonic(), answer)
        expected = SMS_FRAMEWORK[framework]
        if cached[1] != expected:
            return False, f"the SMS {redact_urls(url)} runs {cached[1]}, not {expected}"
        return True, url

    def challenge(self, taskid: str, url: str) -> tuple[str, str]:
        """The enclave challenge of ``taskid`` from the SMS at ``url`` (the task must be
        initialized on chain): (address, "") or ("", why not now)."""
        down = self._down(url)
        if down:
            return "", down
        signature = personal_sign(self.wallet.account.key, challenge_request_digest(taskid))
        try:
            address = self._client(url).enclave_challenge(taskid, signature)
        except TeeServiceError as exc:
            self._failed(url, str(exc))
            return "", str(exc)
        self._store_result_proxy(url)
        return address, ""

    def _store_result_proxy(self, url: str) -> None:
        """The pool's result proxy, as the owner's web2 secret in the SMS (once per SMS and
        process; a failure is tried again with the next challenge)."""
        proxy = self.settings.result_proxy_url
        if not proxy or url in self._proxy_stored:
            return
        try:
            self._client(url).set_web2_secret(
                self.wallet.account.key, self.wallet.address, SECRET_RESULT_PROXY_URL, proxy
            )
        except TeeServiceError as exc:
            log.warning("result proxy URL not stored in the SMS %s: %s", redact_urls(url), exc)
            return
        self._proxy_stored.add(url)
        log.info("result proxy %s stored in the SMS %s", redact_urls(proxy), redact_urls(url))
