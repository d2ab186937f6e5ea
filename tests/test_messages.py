"""Signed worker messages, fast: the envelope's EIP-712 digest is the one wallets compute, a
tampered payload, another signer, another pool, a stale, future or replayed message are each
refused with their reason and counted; the scheduler's inbox applies a report only once the
chain confirms what it claims. Fakes of the chain and Celery, mongomock, fakeredis."""

from __future__ import annotations

import json
import time
from typing import Any

import fakeredis
import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import keccak

from poco.results import result_link
from poco.types import ChainTaskStatus, ContributionStatus
from pool.messages import (
    AUTHORIZE,
    HEARTBEAT,
    MESSAGE_TYPE,
    REPORT,
    AuthorizeRequest,
    Domain,
    Heartbeat,
    MessageSigner,
    Messenger,
    Refusals,
    Refused,
    ReplicateReport,
    check_time,
    message_digest,
)
from pool.settings import Settings
from pool.states import ReplicateStatus, TaskStatus
from pool.store import Store
from scheduler.context import SchedulerContext
from scheduler.reports import NotYet
from scheduler.service import Scheduler
from testing.celery import FakeCelery
from testing.chain import POOL, FakeChain, FakeWallet, chain_task, contribution
from testing.store import memory_store
from testing.workers import SigningWorker

DOMAIN = Domain(65535, POOL)
KEY_A = "0x" + "a1" * 32
KEY_B = "0x" + "b2" * 32
TASK = "0x" + "7a" * 32
NOW = 1_000_000
LINK = result_link("ipfs", "/ipfs/QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o")


def beat(worker: str, slots: int = 2) -> Heartbeat:
    return Heartbeat(worker, "node", ("standard",), slots, 0, "0.1.0")


# ---- the envelope ------------------------------------------------------------------------------
def test_the_digest_is_eip712_as_wallets_compute_it_and_a_wallet_signature_opens() -> None:
    signer = MessageSigner(KEY_A, DOMAIN)
    envelope = signer.seal(HEARTBEAT, beat(signer.address))
    typed: dict[str, Any] = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "WorkerMessage": [
                {"name": n, "type": t}
                for t, n in (
                    part.split(" ")
                    for part in MESSAGE_TYPE.removeprefix("WorkerMessage(")[:-1].split(",")
                )
            ],
        },
        "primaryType": "WorkerMessage",
        "domain": DOMAIN.typed_data(),
        "message": {
            "kind": envelope["kind"],
            "worker": envelope["worker"],
            "bodyHash": keccak(text=envelope["body"]),
            "nonce": bytes.fromhex(envelope["nonce"][2:]),
            "issuedAt": envelope["issuedAt"],
        },
    }
    assert typed["domain"]["name"] == "workerpool" and typed["domain"]["chainId"] == 65535
    # the digest pinned to eth_account's own EIP-712 encoder
    ours = message_digest(
        DOMAIN,
        envelope["kind"],
        envelope["worker"],
        keccak(text=envelope["body"]),
        bytes.fromhex(envelope["nonce"][2:]),
        envelope["issuedAt"],
    )
    assert ours == _hash_eip191_message(encode_typed_data(full_message=typed))
    # a signature made by eth_account (what a wallet's eth_signTypedData_v4 gives) opens
    signed = Account.sign_typed_data(KEY_A, full_message=typed)
    assert "0x" + bytes(signed.signature).hex() == envelope["sig"]  # RFC 6979: the same
    opened = HEARTBEAT.open(envelope, DOMAIN)
    assert opened.signer == signer.address.lower() and opened.payload == beat(signer.address)
    assert opened.issued_at == envelope["issuedAt"]


def _refused(reason: str, message: Any, envelope: Any, domain: Domain = DOMAIN) -> Refused:
    with pytest.raises(Refused) as caught:
        message.open(envelope, domain)
    assert caught.value.reason == reason, caught.value
    return caught.value


def test_a_tampered_payload_another_signer_pool_or_message_are_refused() -> None:
    a, b = MessageSigner(KEY_A, DOMAIN), MessageSigner(KEY_B, DOMAIN)
    envelope = a.seal(HEARTBEAT, beat(a.address))
    # the payload changed after signing (more slots): the signature is another key's
    tampered = {**envelope, "body": envelope["body"].replace('"slots":2', '"slots":2000')}
    assert tampered["body"] != envelope["body"]
    refusal = _refused("wrong_signer", HEARTBEAT, tampered)
    assert refusal.claimed == a.address
    # B signs a message that names A (in the envelope and the payload)
    forged = b.seal(HEARTBEAT, beat(a.address))
    _refused("wrong_signer", HEARTBEAT, {**forged, "worker": a.address})
    # B signs for itself, its payload names A
    _refused("wrong_signer", HEARTBEAT, forged)
    # A's message for another pool, or for another chain, or sent as another message
    _refused("wrong_signer", HEARTBEAT, envelope, Domain(65535, "0x" + "33" * 20))
    _refused("wrong_signer", HEARTBEAT, envelope, Domain(1, POOL))
    _refused("malformed", AUTHORIZE, envelope)
    # a signature that recovers nothing
    _refused("bad_signature", HEARTBEAT, {**envelope, "sig": "0x" + "00" * 65})


@pytest.mark.parametrize(
    "change",
    [
        lambda e: {"worker": e["worker"], "slots": "x"},  # the unsigned payload of old
        lambda e: {**e, "v": 2},
        lambda e: {**e, "extra": 1},
        lambda e: {**e, "nonce": "0x12"},
        lambda e: {**e, "issuedAt": "now"},
        lambda e: {**e, "issuedAt": True},
        lambda e: {**e, "sig": 7},
        lambda e: {**e, "worker": "nobody"},
        lambda e: {**e, "body": "x" * (64 * 1024 + 1)},
        lambda e: [e],
        lambda e: None,
    ],
)
def test_a_malformed_envelope_is_refused_as_such(change: Any) -> None:
    a = MessageSigner(KEY_A, DOMAIN)
    _refused("malformed", HEARTBEAT, change(a.seal(HEARTBEAT, beat(a.address))))


def test_a_signed_payload_of_the_wrong_types_is_malformed() -> None:
    a = MessageSigner(KEY_A, DOMAIN)
    wrong = {**beat(a.address).to_wire(), "slots": "x"}
    body = json.dumps(wrong, sort_keys=True, separators=(",", ":"))
    digest_parts = keccak(text=body)
    envelope = a.seal(HEARTBEAT, beat(a.address))
    nonce = bytes.fromhex(envelope["nonce"][2:])
    digest = message_digest(
        DOMAIN, HEARTBEAT.name, a.address, digest_parts, nonce, envelope["issuedAt"]
    )
    sig = a._key.sign_recoverable(digest, hasher=None)
    envelope = {**envelope, "body": body, "sig": "0x" + sig[:64].hex() + f"{sig[64] + 27:02x}"}
    refusal = _refused("malformed", HEARTBEAT, envelope)
    assert "expected int" in str(refusal)


def test_time_bounds() -> None:
    a = MessageSigner(KEY_A, DOMAIN)
    opened = HEARTBEAT.open(a.seal(HEARTBEAT, beat(a.address), now=NOW), DOMAIN)
    check_time(opened, NOW + 60, max_age=60, skew=60)
    check_time(opened, NOW - 60, max_age=60, skew=60)
    with pytest.raises(Refused, match="stale"):
        check_time(opened, NOW + 61, max_age=60, skew=60)
    with pytest.raises(Refused, match="future"):
        check_time(opened, NOW - 61, max_age=60, skew=60)


# ---- the scheduler's inbox ---------------------------------------------------------------------
class Pool:
    """A scheduler on fakes of the chain and Celery, with a fake Redis for the nonces and the
    refusal counts, and two workers that sign their messages."""

    def __init__(self, **settings: Any) -> None:
        self.store: Store = memory_store("workerpool-messages")
        self.chain = FakeChain(now=int(time.time()), hub=POOL)
        self.celery = FakeCelery()
        self.redis = fakeredis.FakeRedis()
        ctx = SchedulerContext(
            Settings(pool_address=POOL, chain_rpc_url="http://fake", hub_address=POOL, **settings),
            self.store,
            self.chain,  # type: ignore[arg-type]
            FakeWallet(self.chain),  # type: ignore[arg-type]
            Messenger(self.celery),
            self.redis,
        )
        self.scheduler = Scheduler(ctx)
        self.inbox = self.scheduler.inbox
        self.a = SigningWorker(KEY_A, ctx.domain, "a")
        self.b = SigningWorker(KEY_B, ctx.domain, "b")

    def refused(self) -> dict[tuple[str, str], int]:
        return {(m.rpartition(".")[2], r): n for (m, r), n in Refusals(self.redis).read().items()}

    def task(self, status: str = "RUNNING", trust: int = 2, **fields: Any) -> None:
        now = self.chain.now
        doc = {
            "chainTaskId": TASK,
            "chainDealId": "0x" + "de" * 32,
            "index": 0,
            "status": status,
            "trust": trust,
            "queue": "replicates.standard",
            "timeref": 300,
            "contributionDeadline": now + 3000,
            "finalDeadline": now + 9000,
            "jobsQueued": 2,
            "replicatesNeeded": 2,
            "replicatesGranted": 0,
            **fields,
        }
        self.store.save_deal({"chainDealId": doc["chainDealId"]}, [doc])

    def replicate(self, worker: SigningWorker, status: ReplicateStatus) -> None:
        self.store.create_replicate(TASK, worker.address, {})
        self.store.advance_replicate(TASK, worker.address, status)

    def status(self, worker: SigningWorker) -> str:
        return str((self.store.replicate(TASK, worker.address) or {}).get("status"))


@pytest.fixture
def pool() -> Pool:
    return Pool()


def test_a_heartbeat_joins_the_fleet_once_and_its_replay_stale_or_absurd_twins_do_not(
    pool: Pool,
) -> None:
    envelope = pool.a.heartbeat()
    pool.inbox.heartbeat(envelope)
    assert pool.store.worker(pool.a.address)["status"] == "ALIVE"  # type: ignore[index]
    # replayed
    pool.inbox.heartbeat(envelope)
    # another key speaking for A, with absurd slots
    forged = pool.b.signer.seal(HEARTBEAT, beat(pool.a.address, slots=10**9))
    pool.inbox.heartbeat({**forged, "worker": pool.a.address})
    # B speaks for itself, but with more slots than WORKERPOOL_WORKER_MAX_SLOTS
    pool.inbox.heartbeat(pool.b.heartbeat(slots=65))
    # B's heartbeat issued 2 minutes ago
    old = pool.b.signer.seal(HEARTBEAT, beat(pool.b.address), now=time.time() - 120)
    pool.inbox.heartbeat(old)
    assert pool.refused() == {
        ("worker_heartbeat", "replay"): 1,
        ("worker_heartbeat", "wrong_signer"): 1,
        ("worker_heartbeat", "bad_heartbeat"): 1,
        ("worker_heartbeat", "stale"): 1,
    }
    assert [w["address"] for w in pool.store.all_workers()] == [pool.a.address.lower()]
    assert pool.store.worker(pool.a.address)["slots"] == 2  # type: ignore[index]


def test_the_allowlist_applies_to_the_proven_address() -> None:
    pool = Pool(worker_allowlist=(MessageSigner(KEY_A, DOMAIN).address,))
    pool.inbox.heartbeat(pool.a.heartbeat())
    pool.inbox.heartbeat(pool.b.heartbeat())
    answer = pool.inbox.authorize(pool.b.authorize(TASK))
    assert not answer.granted and answer.requeue and answer.reason == "refused: not_allowed"
    assert pool.refused() == {
        ("worker_heartbeat", "not_allowed"): 1,
        ("authorize", "not_allowed"): 1,
    }
    assert [w["address"] for w in pool.store.all_workers()] == [pool.a.address.lower()]


def test_authorize_needs_a_verified_heartbeat_and_reserves_no_slot_for_a_forgery(
    pool: Pool,
) -> None:
    pool.task()
    # another key asks in A's name: refused before anything is reserved
    forged = pool.b.signer.seal(AUTHORIZE, AuthorizeRequest(TASK, pool.a.address))
    answer = pool.inbox.authorize({**forged, "worker": pool.a.address})
    assert not answer.granted and answer.reason.startswith("refused: wrong_signer (are the")
    # A itself, before any heartbeat of its own
    answer = pool.inbox.authorize(pool.a.authorize(TASK))
    assert not answer.granted and "no heartbeat" in answer.reason and answer.requeue
    assert pool.store.task(TASK)["replicatesGranted"] == 0  # type: ignore[index]
    assert pool.store.replicates_of(TASK) == []
    # once its heartbeat verified, A is granted; the same request again is a replay
    pool.inbox.heartbeat(pool.a.heartbeat(slots=1))
    request = pool.a.authorize(TASK)
    assert pool.inbox.authorize(request).granted
    again = pool.inbox.authorize(request)
    assert not again.granted and again.reason == "refused: replay"
    assert pool.store.task(TASK)["replicatesGranted"] == 1  # type: ignore[index]
    assert pool.refused() == {("authorize", "wrong_signer"): 1, ("authorize", "replay"): 1}


def test_a_node_cannot_hold_more_replicates_than_twice_its_slots(pool: Pool) -> None:
    pool.inbox.heartbeat(pool.a.heartbeat(slots=1))
    for n in range(3):
        tid = "0x" + f"{n + 1:064x}"
        pool.store.save_deal(
            {"chainDealId": tid},
            [
                {
                    "chainTaskId": tid,
                    "status": "RUNNING",
                    "queue": "replicates.standard",
                    "timeref": 300,
                    "contributionDeadline": pool.chain.now + 3000,
                    "replicatesNeeded": 1,
                    "replicatesGranted": 0,
                }
            ],
        )
        answer = pool.inbox.authorize(pool.a.authorize(tid))
        assert answer.granted == (n < 2), (n, answer)
    assert "holds 2 replicates not computed yet for 1 slot(s)" in answer.reason


def test_a_report_counts_only_for_the_signers_own_replicate(pool: Pool) -> None:
    pool.task()
    pool.replicate(pool.a, ReplicateStatus.COMPUTING)
    # B reports a status on A's replicate, in A's name: refused, A's replicate untouched
    forged = pool.b.signer.seal(
        REPORT, ReplicateReport(TASK, pool.a.address, ReplicateStatus.COMPUTED)
    )
    pool.inbox.report({**forged, "worker": pool.a.address})
    # B in its own name: it holds no replicate of the task
    pool.inbox.report(pool.b.report(TASK, "COMPUTED"))
    assert pool.status(pool.a) == "COMPUTING"
    # A's own report applies, and the same message again is a replay
    envelope = pool.a.report(TASK, "COMPUTED", duration=1.5)
    pool.inbox.report(envelope)
    pool.inbox.report(envelope)
    assert pool.status(pool.a) == "COMPUTED"
    assert pool.refused() == {
        ("replicate_update", "wrong_signer"): 1,
        ("replicate_update", "unknown_replicate"): 1,
        ("replicate_update", "replay"): 1,
    }


def test_a_report_from_the_future_or_older_than_two_days_is_refused(pool: Pool) -> None:
    pool.task()
    pool.replicate(pool.a, ReplicateStatus.COMPUTING)
    report = ReplicateReport(TASK, pool.a.address, ReplicateStatus.COMPUTED)
    pool.inbox.report(pool.a.signer.seal(REPORT, report, now=time.time() + 3600))
    pool.inbox.report(pool.a.signer.seal(REPORT, report, now=time.time() - 3 * 86400))
    assert pool.status(pool.a) == "COMPUTING"
    # a report that waited a day in Redis (a scheduler outage) is still good
    pool.inbox.report(pool.a.signer.seal(REPORT, report, now=time.time() - 86400))
    assert pool.status(pool.a) == "COMPUTED"
    assert pool.refused() == {("replicate_update", "future"): 1, ("replicate_update", "stale"): 1}


def test_a_contribution_is_taken_once_the_chain_shows_it_and_a_retry_is_no_replay(
    pool: Pool,
) -> None:
    pool.task()
    pool.replicate(pool.a, ReplicateStatus.CONTRIBUTING)
    pool.chain.tasks[TASK] = chain_task(TASK, ChainTaskStatus.ACTIVE, [])
    envelope = pool.a.report(TASK, "CONTRIBUTED", tx_hash="0x" + "ab" * 32)
    # the scheduler's node does not show the contribution yet: asked again later
    with pytest.raises(NotYet):
        pool.inbox.report(envelope, last_try=False)
    assert pool.status(pool.a) == "CONTRIBUTING"
    # then it does: the same message (Celery's retry) is applied, not taken for a replay
    pool.chain.tasks[TASK] = chain_task(TASK, ChainTaskStatus.ACTIVE, [pool.a.address])
    pool.inbox.report(envelope, last_try=False)
    assert pool.status(pool.a) == "CONTRIBUTED" and pool.refused() == {}


def test_implied_statuses_are_checked_too_and_a_claim_never_confirmed_is_refused(
    pool: Pool,
) -> None:
    pool.task()
    pool.replicate(pool.a, ReplicateStatus.COMPUTED)
    pool.chain.tasks[TASK] = chain_task(TASK, ChainTaskStatus.ACTIVE, [])
    # REVEALED from COMPUTED implies CONTRIBUTED: nothing of it is on chain
    pool.inbox.report(pool.a.report(TASK, "REVEALED"), last_try=True)
    assert pool.status(pool.a) == "COMPUTED"
    # RESULT_UPLOADED from COMPUTED crosses the upload the scheduler never asked of A
    pool.inbox.report(pool.a.report(TASK, "RESULT_UPLOADED", result_link=LINK))
    assert pool.status(pool.a) == "COMPUTED"
    assert pool.refused() == {
        ("replicate_update", "not_on_chain"): 1,
        ("replicate_update", "not_uploader"): 1,
    }
    assert pool.store.task(TASK)["status"] == "RUNNING"  # type: ignore[index]


def test_only_the_worker_asked_to_upload_gives_the_result_link(pool: Pool) -> None:
    pool.task(status="RESULT_UPLOADING", uploader="", resultLink="")
    pool.store.set_task_fields(TASK, {"uploader": pool.a.address.lower()})
    pool.replicate(pool.a, ReplicateStatus.REVEALED)
    pool.replicate(pool.b, ReplicateStatus.REVEALED)
    for worker in (pool.a, pool.b):
        pool.chain.contributions[(TASK, worker.address.lower())] = contribution(
            ContributionStatus.PROVED
        )
    # B, a winner too, was not asked: its link is refused
    pool.inbox.report(
        pool.b.report(TASK, "RESULT_UPLOADED", result_link=LINK.replace("QmT", "QmX"))
    )
    # A, asked, with something that is no result link
    pool.inbox.report(pool.a.report(TASK, "RESULT_UPLOADED", result_link="http://evil/x"))
    assert pool.store.task(TASK)["status"] == "RESULT_UPLOADING"  # type: ignore[index]
    assert pool.refused() == {
        ("replicate_update", "not_uploader"): 1,
        ("replicate_update", "bad_result_link"): 1,
    }
    # A's real upload is taken
    pool.chain.tasks[TASK] = chain_task(TASK, ChainTaskStatus.REVEALING, [pool.a.address])
    pool.inbox.report(pool.a.report(TASK, "RESULT_UPLOADED", result_link=LINK))
    doc = pool.store.task(TASK) or {}
    assert doc["resultLink"] == LINK and doc["status"] == str(TaskStatus.COMPLETED)
    assert pool.chain.tasks[TASK].results == LINK.encode()  # finalized with A's link


def test_a_worker_finalized_task_is_taken_from_the_chain_never_from_the_report(
    pool: Pool,
) -> None:
    pool.task(trust=1)
    pool.replicate(pool.a, ReplicateStatus.CONTRIBUTING)
    pool.chain.tasks[TASK] = chain_task(TASK, ChainTaskStatus.ACTIVE, [])
    claim = pool.a.report(TASK, "COMPLETED", result_link="mine", finalized=True)
    # the chain does not say COMPLETED: nothing recorded, refused on the last try
    pool.inbox.report(claim, last_try=True)
    assert pool.store.task(TASK)["status"] == "RUNNING"  # type: ignore[index]
    # a COMPLETED that does not say it finalized is the scheduler's to set
    pool.inbox.report(pool.a.report(TASK, "COMPLETED"))
    assert pool.refused() == {
        ("replicate_update", "not_on_chain"): 1,
        ("replicate_update", "bad_status"): 1,
    }
    # once the chain says COMPLETED, the link recorded is the chain's
    pool.chain.tasks[TASK] = chain_task(
        TASK, ChainTaskStatus.COMPLETED, [pool.a.address], results=LINK.encode()
    )
    pool.inbox.report(pool.a.report(TASK, "COMPLETED", result_link="mine", finalized=True))
    doc = pool.store.task(TASK) or {}
    assert doc["status"] == "COMPLETED" and doc["resultLink"] == LINK
    assert pool.status(pool.a) == "COMPLETED"
