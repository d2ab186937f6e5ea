"""The requester's routes on a store built by hand (no chain, no worker): iexec-core's task
and replicate models to the field, the logs challenge and who gets the logs, the compute
logs' retention, the Compass-shaped discovery route, and the worker's refusal of requests
it cannot honour. The same routes on a real pool, with the iExec SDK: test_requester.py."""

from __future__ import annotations

import datetime as dt
from typing import Any

import fakeredis
import mongomock_ng as mongomock
import pytest
from eth_account import Account

from api.app import create_app
from api.context import ChainProbe
from api.core import LogChallenges, challenge_typed_data, core_date, recover_signer
from orders.challenge import authorization_header, typed_data_hash
from poco.params import DealParams
from poco.proofs import result_hash
from pool.clock import utcnow
from pool.messages import MessageError, ReplicateReport
from pool.settings import Settings
from pool.states import ReplicateStatus, ReplicateStatusCause, TaskStatus
from pool.store import MAX_TASK_LOGS, Store
from workers.inputs import refusal
from workers.runner import capped_log, cut_notice

POOL = "0x" + "ab" * 20
HUB = "0x" + "ef" * 20
CHAIN_ID = 65535
DEAL = "0x" + "d0" * 32
TASK = "0x" + "7a" * 32
APP = "0x" + "a9" * 20
REQUESTER_KEY = "0x" + "11" * 32
STRANGER_KEY = "0x" + "22" * 32
REQUESTER = Account.from_key(REQUESTER_KEY).address
WORKER = "0x" + "c1" * 20
FAILED_WORKER = "0x" + "c2" * 20
DIGEST = "0x" + "5d" * 32
FINAL_DEADLINE = 4_000_000_000  # far ahead: the logs are within their retention

# iexec-core's TaskModel, every field, in its order (no @JsonInclude: all always present)
TASK_MODEL = [
    "chainTaskId",
    "replicates",
    "maxExecutionTime",
    "tag",
    "dappType",
    "dappName",
    "commandLine",
    "initializationBlockNumber",
    "currentStatus",
    "trust",
    "uploadingWorkerWalletAddress",
    "consensus",
    "contributionDeadline",
    "revealDeadline",
    "finalDeadline",
    "resultLink",
    "chainCallbackData",
    "dateStatusList",
]
# iexec-core's ReplicateModel (NON_EMPTY: the empty ones are left out)
REPLICATE_MODEL = {
    "self",
    "chainTaskId",
    "walletAddress",
    "currentStatus",
    "statusUpdateList",
    "resultLink",
    "chainCallbackData",
    "contributionHash",
    "appLogs",
    "appExitCode",
    "teeSessionGenerationError",
}


class FakeChainClient:
    chain_id = CHAIN_ID

    def block_number(self) -> int:
        return 100

    def workerpool_owner(self, pool: str) -> str:
        return "0x" + "cd" * 20

    def app_multiaddr(self, app: str) -> bytes:
        assert app == APP
        return b"docker.io/example/app:1"


def _store() -> Store:
    """A completed trust-2 task: one worker completed (its logs stored), one failed."""
    store = Store(mongomock.MongoClient()["requester"])
    store.ensure_indexes()
    store.save_deal(
        {
            "chainDealId": DEAL,
            "status": "ACCEPTED",
            "app": APP,
            "requester": REQUESTER,
            "params": '{"iexec_args":"alice bob"}',
        },
        [
            {
                "chainTaskId": TASK,
                "chainDealId": DEAL,
                "index": 0,
                "status": "RECEIVED",
                "trust": 2,
                "tag": "0x" + "00" * 32,
                "timeref": 300,
                "contributionDeadline": FINAL_DEADLINE - 3000,
                "finalDeadline": FINAL_DEADLINE,
            }
        ],
    )
    for status in ("INITIALIZED", "RUNNING", "CONSENSUS_REACHED"):
        store.transition_task(TASK, TaskStatus(status), tx_hash="0x" + "01" * 32)
    store.set_task_fields(
        TASK,
        {
            "consensusValue": result_hash(TASK, DIGEST),
            "revealDeadline": FINAL_DEADLINE - 2000,
            "uploader": WORKER,
            "resultLink": '{ "storage": "ipfs", "location": "/ipfs/QmX" }',
            "callbackData": "",
        },
    )
    # a note that is no TaskStatus never reaches iExec clients
    store.tasks.update_one({"chainTaskId": TASK}, {"$push": {"timeline": {"status": "x"}}})
    store.create_replicate(TASK, WORKER, {})
    store.advance_replicate(
        TASK, WORKER, ReplicateStatus.COMPUTED, extra={"resultDigest": DIGEST, "note": "x"}
    )
    store.advance_replicate(TASK, WORKER, ReplicateStatus.CONTRIBUTED, tx_hash="0x" + "02" * 32)
    store.create_replicate(TASK, FAILED_WORKER, {})
    store.advance_replicate(
        TASK,
        FAILED_WORKER,
        ReplicateStatus.COMPUTE_FAILED,
        note="app exited with code 3",
        cause=ReplicateStatusCause.APP_COMPUTE_FAILED,
        extra={"exitCode": 3, "logTail": "boom"},
    )
    expires = utcnow() + dt.timedelta(days=3)
    assert store.add_compute_logs(TASK, WORKER, "hello\n", "", expires)
    assert store.add_compute_logs(TASK, FAILED_WORKER, "starting\n", "boom\n", expires)
    for worker in (WORKER, FAILED_WORKER):
        store.set_replicate_fields(TASK, worker, {"appComputeLogsPresent": True})
    return store


def _app(store: Store, **kw: Any) -> Any:
    settings = Settings(
        pool_address=POOL,
        chain_rpc_url="http://127.0.0.1:1",
        hub_address=HUB,
        public_url="https://pool.example/some/path",
        **kw,
    )
    return create_app(
        settings,
        store,
        redis=fakeredis.FakeRedis(),
        chain=ChainProbe(settings, FakeChainClient()),
    )


@pytest.fixture
def client() -> Any:
    return _app(_store()).test_client()


# ---- the task and replicate models ------------------------------------------------------------
def test_task_route_answers_iexec_core_task_model_to_the_field(client: Any) -> None:
    body = client.get(f"/tasks/{TASK.upper().replace('0X', '0x')}").get_json()
    assert list(body) == TASK_MODEL
    assert body["chainTaskId"] == TASK
    assert body["currentStatus"] == "CONSENSUS_REACHED"
    assert body["trust"] == 2 and body["maxExecutionTime"] == 300_000
    assert body["dappType"] == "DOCKER" and body["dappName"] == "docker.io/example/app:1"
    assert body["commandLine"] == "alice bob"
    assert body["consensus"] == result_hash(TASK, DIGEST)
    assert body["uploadingWorkerWalletAddress"] == WORKER
    assert body["chainCallbackData"] is None  # "" stored: null, as core's unset field
    assert body["finalDeadline"] == core_date(FINAL_DEADLINE)
    assert body["finalDeadline"].endswith("+00:00")
    statuses = [change["status"] for change in body["dateStatusList"]]
    assert statuses == ["RECEIVED", "INITIALIZED", "RUNNING", "CONSENSUS_REACHED"]
    first, second = body["dateStatusList"][:2]
    assert set(first) == {"date", "status"}
    assert second["chainReceipt"] == {"blockNumber": 0, "txHash": "0x" + "01" * 32}
    assert [r["walletAddress"] for r in body["replicates"]] == [WORKER, FAILED_WORKER]


def test_replicate_models_carry_core_fields_only(client: Any) -> None:
    body = client.get(f"/tasks/{TASK}").get_json()
    done, failed = body["replicates"]
    for model in (done, failed):
        assert set(model) <= REPLICATE_MODEL  # nothing of ours: Java clients refuse it
        assert "logTail" not in str(model) and "boom" not in str(model)
    # links from WORKERPOOL_PUBLIC_URL
    assert done["self"] == f"https://pool.example/some/path/tasks/{TASK}/replicates/{WORKER}"
    assert done["appLogs"] == done["self"] + "/logs"
    assert done["currentStatus"] == "CONTRIBUTED"
    assert done["contributionHash"] == result_hash(TASK, DIGEST)
    assert [u["status"] for u in done["statusUpdateList"]] == [
        "CREATED",
        "STARTING",
        "APP_DOWNLOADING",
        "COMPUTING",
        "COMPUTED",
        "CONTRIBUTING",
        "CONTRIBUTED",
    ]
    assert failed["currentStatus"] == "COMPUTE_FAILED" and failed["appExitCode"] == 3
    assert failed["statusUpdateList"][-1]["cause"] == "APP_COMPUTE_FAILED"
    assert "contributionHash" not in failed
    alone = client.get(f"/tasks/{TASK}/replicates/{FAILED_WORKER.upper().replace('0X', '0x')}")
    assert alone.status_code == 200 and alone.get_json() == failed


def test_unknown_or_malformed_task_and_replicate_are_404_with_a_string_error(client: Any) -> None:
    for path in (
        f"/tasks/0x{'00' * 32}",
        "/tasks/not-a-task",
        f"/tasks/{TASK}/replicates/0x{'00' * 20}",
        f"/tasks/{TASK}/replicates/nope",
    ):
        answer = client.get(path)
        assert answer.status_code == 404
        assert isinstance(answer.get_json()["error"], str)  # the SDK prints it as is


# ---- the logs -----------------------------------------------------------------------------------
def _challenge(client: Any, key: str) -> dict[str, Any]:
    address = Account.from_key(key).address
    answer = client.get(f"/tasks/logs/challenge?address={address}&chainId={CHAIN_ID}")
    assert answer.status_code == 200
    typed: dict[str, Any] = answer.get_json()
    return typed


def test_logs_challenge_is_core_eip712_typed_data_reused_for_an_address(client: Any) -> None:
    typed = _challenge(client, REQUESTER_KEY)
    assert typed["domain"] == {"name": "iExec Core", "version": "1", "chainId": CHAIN_ID}
    assert typed["primaryType"] == "Challenge"
    assert typed["types"]["Challenge"] == [{"name": "challenge", "type": "string"}]
    assert len(typed["message"]["challenge"]) == 44  # base64 of 32 random bytes
    assert _challenge(client, REQUESTER_KEY) == typed  # the same for 60 minutes
    assert _challenge(client, STRANGER_KEY) != typed
    assert client.get("/tasks/logs/challenge?address=nope").status_code == 400


def test_requester_signing_the_challenge_gets_every_workers_logs(client: Any) -> None:
    header = authorization_header(_challenge(client, REQUESTER_KEY), REQUESTER_KEY)
    answer = client.get(f"/tasks/{TASK}/logs", headers={"Authorization": header})
    assert answer.status_code == 200
    assert answer.get_json() == {
        "chainTaskId": TASK,
        "computeLogsList": [
            {"walletAddress": WORKER, "stdout": "hello\n"},  # empty stderr left out
            {"walletAddress": FAILED_WORKER, "stdout": "starting\n", "stderr": "boom\n"},
        ],
    }
    # the challenge is not consumed: the same header works again, and for one replicate
    again = client.get(f"/tasks/{TASK}/logs", headers={"Authorization": header})
    assert again.status_code == 200
    one = client.get(
        f"/tasks/{TASK}/replicates/{FAILED_WORKER}/logs", headers={"Authorization": header}
    )
    assert one.get_json() == {
        "walletAddress": FAILED_WORKER,
        "stdout": "starting\n",
        "stderr": "boom\n",
    }


def test_only_the_requester_with_its_live_challenge_gets_logs(client: Any) -> None:
    stranger = authorization_header(_challenge(client, STRANGER_KEY), STRANGER_KEY)
    path = f"/tasks/{TASK}/logs"
    assert client.get(path, headers={"Authorization": stranger}).status_code == 403
    assert client.get(path).status_code == 400  # no header
    # the requester's address with a signature of someone else: 401
    typed = _challenge(client, REQUESTER_KEY)
    forged = authorization_header(typed, STRANGER_KEY).rsplit("_", 1)[0] + f"_{REQUESTER}"
    assert client.get(path, headers={"Authorization": forged}).status_code == 401
    for bad in ("garbage", "a_b", f"0x12_0x34_{REQUESTER}_x", f"0x12_0xzz_{REQUESTER}"):
        assert client.get(path, headers={"Authorization": bad}).status_code in (401,)
    # a signature over a challenge the pool never gave
    other = challenge_typed_data(CHAIN_ID, "not-the-challenge")
    assert (
        client.get(path, headers={"Authorization": authorization_header(other, REQUESTER_KEY)})
    ).status_code == 401
    # an unknown task has no requester: 403, as iexec-core
    header = authorization_header(typed, REQUESTER_KEY)
    unknown = f"/tasks/0x{'00' * 32}/logs"
    assert client.get(unknown, headers={"Authorization": header}).status_code == 403


def test_a_requester_without_a_challenge_or_with_an_expired_one_gets_401() -> None:
    client = _app(_store()).test_client()
    typed = challenge_typed_data(CHAIN_ID, "AAAA")
    header = authorization_header(typed, REQUESTER_KEY)
    assert client.get(f"/tasks/{TASK}/logs", headers={"Authorization": header}).status_code == 401
    challenges = LogChallenges(ttl=0.0)
    challenges.for_address(REQUESTER)
    assert challenges.current(REQUESTER) is None  # expired at once
    bounded = LogChallenges(limit=2)
    for n in range(5):
        bounded.for_address(f"0x{n:040x}")
    assert bounded.current(f"0x{0:040x}") is None and bounded.current(f"0x{4:040x}")


def test_challenge_signature_matches_the_sdk_test_vector() -> None:
    """The vector the research note computed with the SDK's ethers TypedDataEncoder."""
    typed = challenge_typed_data(134, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
    digest = typed_data_hash(typed)
    assert digest == "0xe903e64fe9c10c43a3cd77415c128f918225afc475066039d21d8e3f48a3f8fc"
    signature = (
        "0x961477d77066e88abab58df75f8c34cab6d426574a1dce1c2ea4f013cd2b8767"
        "202ccd521f2b4981cf93fee98ee486652e6a2ce531f026bb09a4d1af1cb589921b"
    )
    assert recover_signer(digest, signature) == "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
    assert recover_signer(digest, "0x1234") is None


def test_task_without_logs_is_404_for_its_requester() -> None:
    store = _store()
    store.task_logs.delete_many({})
    client = _app(store).test_client()
    header = authorization_header(_challenge(client, REQUESTER_KEY), REQUESTER_KEY)
    answer = client.get(f"/tasks/{TASK}/logs", headers={"Authorization": header})
    assert answer.status_code == 404 and isinstance(answer.get_json()["error"], str)


def test_no_anonymous_route_shows_compute_logs(client: Any) -> None:
    for path in ("/api/v1/tasks", f"/api/v1/tasks/{TASK}", f"/tasks/{TASK}", "/api/v1/deals"):
        answer = client.get(path)
        assert answer.status_code == 200
        assert "hello\\n" not in answer.get_data(as_text=True)


# ---- compute logs in the store --------------------------------------------------------------
def test_compute_logs_first_report_wins_bounded_and_deleted_after_retention() -> None:
    store = Store(mongomock.MongoClient()["logs"])
    store.ensure_indexes()
    now = utcnow()
    later = now + dt.timedelta(days=3)
    assert store.add_compute_logs(TASK, WORKER, "first", "", later)
    assert not store.add_compute_logs(TASK, WORKER.upper().replace("0X", "0x"), "again", "", later)
    assert [e["stdout"] for e in store.compute_logs(TASK)] == ["first"]
    for n in range(MAX_TASK_LOGS + 3):
        store.add_compute_logs(TASK, f"0x{n:040x}", "x", "", later)
    assert len(store.compute_logs(TASK)) == MAX_TASK_LOGS
    # retention: not served once past, deleted by the purge
    assert store.compute_logs(TASK, now + dt.timedelta(days=4)) == []
    assert store.purge_compute_logs(now) == 0
    assert store.purge_compute_logs(now + dt.timedelta(days=4)) == 1
    assert store.task_logs.count_documents({}) == 0
    ttl = [i for i in store.task_logs.index_information().values() if "expireAfterSeconds" in i]
    assert ttl and ttl[0]["key"] == [("expiresAt", 1)] and ttl[0]["expireAfterSeconds"] == 0


# ---- discovery ---------------------------------------------------------------------------
def test_compass_route_gives_this_pools_api_root_and_404_otherwise(client: Any) -> None:
    answer = client.get(f"/{CHAIN_ID}/workerpools/{POOL.upper().replace('0X', '0x')}")
    assert answer.status_code == 200
    # the SDK resolves /tasks/... against apiUrl from its root: the path is dropped
    assert answer.get_json()["apiUrl"] == "https://pool.example"
    assert client.get(f"/{CHAIN_ID}/workerpools/0x{'12' * 20}").status_code == 404
    assert client.get(f"/1/workerpools/{POOL}").status_code == 404
    assert "error" in client.get(f"/1/workerpools/{POOL}").get_json()


# ---- requests the pool refuses --------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "tee", "callback", "refused"),
    [
        (DealParams(iexec_result_encryption=True), False, False, "iexec_result_encryption"),
        (DealParams(iexec_result_encryption=True), True, False, ""),  # TEE: not ours to judge
        (DealParams(iexec_result_storage_provider="dropbox"), False, False, "dropbox"),
        (DealParams(iexec_result_storage_provider="dropbox"), False, True, ""),  # on chain
        (DealParams(iexec_result_storage_provider="ipfs"), False, False, ""),
        (DealParams(), False, False, ""),
    ],
)
def test_worker_refuses_what_a_standard_task_cannot_honour(
    params: DealParams, tee: bool, callback: bool, refused: str
) -> None:
    reason = refusal(params, tee=tee, callback=callback)
    assert (refused in reason and reason) if refused else reason == ""


def test_a_report_with_a_cause_outside_iexecs_enum_is_refused() -> None:
    wire = ReplicateReport(TASK, WORKER, ReplicateStatus.START_FAILED).to_wire()
    ok = ReplicateReport.from_wire({**wire, "cause": "TASK_DESCRIPTION_INVALID"})
    assert ok.cause == ReplicateStatusCause.TASK_DESCRIPTION_INVALID
    with pytest.raises(MessageError, match="ReplicateStatusCause"):
        ReplicateReport.from_wire({**wire, "cause": "MY_OWN_CAUSE"})


def test_a_compute_log_past_the_cap_keeps_its_end_and_says_it_was_cut() -> None:
    small = b"line\n" * 10
    assert capped_log(small, 1000) == small.decode()
    big = b"".join(f"line {n}\n".encode() for n in range(10_000))
    text = capped_log(big, 1000)
    assert text.startswith(cut_notice(1000)) and text.endswith("line 9999\n")
    assert len(text.encode()) <= 1000
