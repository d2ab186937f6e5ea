"""The protocol kernel against the real PoCo v6.1.0 on anvil: signatures, ids, the trust-1
lifecycle with its escrow moves, revert diagnoses, concurrent senders."""

from __future__ import annotations

import threading

import pytest
from devnet_fixtures import DevnetHandle

from devnet.requester import match_deal
from poco import actions
from poco.chain import ChainClient
from poco.errors import TransactionReverted
from poco.orders import AppOrder, RequestOrder, WorkerpoolOrder, random_salt
from poco.proofs import deal_id, result_hash, sign_authorization, task_id
from poco.types import ChainTaskStatus, Contribution, ContributionStatus, Task

pytestmark = pytest.mark.devnet

APP_PRICE = 1_000_000
POOL_PRICE = 10_000_000
DIGEST = "0x" + "5a" * 32


def _match(devnet: DevnetHandle, **kw: object):
    return match_deal(
        devnet.client,
        app=devnet.app("echo"),
        app_owner_key=devnet.key("app_provider"),
        workerpool=devnet.info["workerpool"],
        scheduler_key=devnet.key("scheduler"),
        requester_key=devnet.key("requester"),
        **kw,  # type: ignore[arg-type]
    )


def _stakes(devnet: DevnetHandle, *addresses: str) -> list[int]:
    return [devnet.client.view_account(a).stake for a in addresses]


def test_orders_signed_by_poco_verify_on_chain_and_hash_keys_view_consumed(
    devnet: DevnetHandle,
) -> None:
    client = devnet.client
    domain = client.domain()
    assert domain.separator() == bytes(client.hub.functions.eip712domain_separator().call())
    # Given orders signed by our EIP-712 code
    deal = _match(devnet, volume=2)
    for order, signer in (
        (deal.apporder, devnet.address("app_provider")),
        (deal.workerpoolorder, devnet.address("scheduler")),
        (deal.requestorder, devnet.address("requester")),
    ):
        # Then the contract's verifySignature accepts them for their signer only
        assert client.verify_signature(signer, order.hash(domain), order.sign)
        assert not client.verify_signature(
            devnet.address("deployer"), order.hash(domain), order.sign
        )
        # And our order hash is the key of viewConsumed after the match
        assert client.view_consumed(order.hash(domain)) == 2


def test_match_orders_emits_the_predicted_dealid_and_initialize_the_predicted_taskid(
    devnet: DevnetHandle,
) -> None:
    client = devnet.client
    domain = client.domain()
    requester = devnet.wallet("requester")
    app = AppOrder(app=devnet.app(), volume=10, salt=random_salt()).signed(
        devnet.key("app_provider"), domain
    )
    pool = WorkerpoolOrder(
        workerpool=devnet.info["workerpool"], volume=10, trust=1, salt=random_salt()
    ).signed(devnet.key("scheduler"), domain)
    request = RequestOrder(
        app=devnet.app(),
        workerpool=devnet.info["workerpool"],
        requester=requester.address,
        volume=2,
        trust=1,
        beneficiary=requester.address,
        salt=random_salt(),
    ).signed(devnet.key("requester"), domain)
    request_hash = request.hash(domain)
    # the request order is matched twice: the second deal's id uses consumed=1... = volume 2
    for _ in range(2):
        consumed = client.view_consumed(request_hash)
        if consumed >= request.volume:
            break
        predicted = deal_id(request_hash, consumed)
        dealid, receipt = actions.match_orders(requester, app, None, pool, request)
        assert dealid == predicted
        notices = client.decode_receipt_events(receipt, "SchedulerNotice")
        assert notices[0]["args"]["workerpool"] == devnet.info["workerpool"]
    deal = client.view_deal(dealid)
    receipt = actions.initialize(devnet.wallet("scheduler"), dealid, deal.bot_first)
    events = client.decode_receipt_events(receipt, "TaskInitialize")
    assert "0x" + bytes(events[0]["args"]["taskid"]).hex() == task_id(dealid, deal.bot_first)


def test_trust1_task_through_contribute_reveal_finalize_moves_escrow_as_poco_says(
    chain_snapshot: DevnetHandle,
) -> None:
    devnet = chain_snapshot
    client = devnet.client
    scheduler = devnet.wallet("scheduler")
    worker = devnet.worker_wallet(0)
    parties = (
        devnet.address("requester"),
        devnet.address("app_provider"),
        worker.address,
        scheduler.address,
    )
    before = _stakes(devnet, *parties)
    score_before = client.view_score(worker.address)
    deal = _match(devnet, appprice=APP_PRICE, workerpoolprice=POOL_PRICE)
    mid = _stakes(devnet, *parties)
    assert mid[0] - before[0] == -(APP_PRICE + POOL_PRICE)
    assert mid[3] - before[3] == -POOL_PRICE * 30 // 100  # scheduler's pool stake locked
    taskid = deal.taskids()[0]

    actions.initialize(scheduler, deal.dealid, deal.bot_first)
    auth = sign_authorization(devnet.key("scheduler"), worker.address, taskid)
    receipt = actions.contribute(worker, taskid, DIGEST, auth)
    assert client.decode_receipt_events(receipt, "TaskConsensus")
    task = client.view_task(taskid)
    assert task.status == ChainTaskStatus.REVEALING
    assert task.consensus_value == result_hash(taskid, DIGEST)

    actions.reveal(worker, taskid, DIGEST)
    results = b'{"storage":"ipfs","location":"/ipfs/QmTest"}'
    actions.finalize(scheduler, taskid, results)

    task = client.view_task(taskid)
    assert task.status == ChainTaskStatus.COMPLETED
    assert task.results == results
    assert client.view_contribution(taskid, worker.address).status == ContributionStatus.PROVED
    after = _stakes(devnet, *parties)
    delta = [a - b for a, b in zip(after, before, strict=True)]
    kitty_bonus = delta[3] - POOL_PRICE // 100
    assert delta[:3] == [-(APP_PRICE + POOL_PRICE), APP_PRICE, POOL_PRICE * 99 // 100]
    assert kitty_bonus >= 0  # the scheduler gets 1 %, plus the kitty share if a claim fed it
    assert client.view_account(worker.address).locked == 0
    # scores move only when replication happened (trust 1: one contributor)
    assert client.view_score(worker.address) == score_before


def test_contribute_and_finalize_completes_in_one_transaction(chain_snapshot: DevnetHandle) -> None:
    devnet = chain_snapshot
    client = devnet.client
    worker = devnet.worker_wallet(1)
    before = _stakes(devnet, devnet.address("requester"), worker.address)
    deal = _match(devnet, appprice=APP_PRICE, workerpoolprice=POOL_PRICE)
    taskid = deal.taskids()[0]
    actions.initialize(devnet.wallet("scheduler"), deal.dealid, deal.bot_first)
    auth = sign_authorization(devnet.key("scheduler"), worker.address, taskid)
    receipt = actions.contribute_and_finalize(worker, taskid, DIGEST, b"link", auth)
    for event in ("TaskContribute", "TaskConsensus", "TaskReveal", "TaskFinalize"):
        assert client.decode_receipt_events(receipt, event), event
    task = client.view_task(taskid)
    assert task.status == ChainTaskStatus.COMPLETED and task.results == b"link"
    after = _stakes(devnet, devnet.address("requester"), worker.address)
    assert [a - b for a, b in zip(after, before, strict=True)] == [
        -(APP_PRICE + POOL_PRICE),
        POOL_PRICE * 99 // 100,
    ]


def test_contribute_without_valid_authorization_names_the_cause(devnet: DevnetHandle) -> None:
    deal = _match(devnet)
    taskid = deal.taskids()[0]
    actions.initialize(devnet.wallet("scheduler"), deal.dealid, deal.bot_first)
    worker = devnet.worker_wallet(2)
    # signed by the requester instead of the scheduler
    forged = sign_authorization(devnet.key("requester"), worker.address, taskid)
    with pytest.raises(TransactionReverted, match="invalid authorization") as err:
        actions.contribute(worker, taskid, DIGEST, forged)
    assert devnet.address("scheduler") in str(err.value)
    # the task is untouched: a valid contribution still goes through
    good = sign_authorization(devnet.key("scheduler"), worker.address, taskid)
    actions.contribute(worker, taskid, DIGEST, good)
    # contributing twice is diagnosed too
    with pytest.raises(
        TransactionReverted, match="consensus was already reached|already contributed"
    ):
        actions.contribute(worker, taskid, DIGEST, good)


def test_finalize_by_a_non_scheduler_names_the_cause(devnet: DevnetHandle) -> None:
    deal = _match(devnet)
    taskid = deal.taskids()[0]
    actions.initialize(devnet.wallet("scheduler"), deal.dealid, deal.bot_first)
    worker = devnet.worker_wallet(3)
    actions.contribute(
        worker, taskid, DIGEST, sign_authorization(devnet.key("scheduler"), worker.address, taskid)
    )
    actions.reveal(worker, taskid, DIGEST)
    with pytest.raises(TransactionReverted, match="only the scheduler") as err:
        actions.finalize(devnet.wallet("requester"), taskid, b"x")
    assert devnet.address("requester") in str(err.value)
    with pytest.raises(TransactionReverted, match="digest does not match|not CONTRIBUTED"):
        actions.reveal(worker, taskid, "0x" + "00" * 32)
    actions.finalize(devnet.wallet("scheduler"), taskid, b"x")


def test_claim_after_final_deadline_refunds_the_requester(chain_snapshot: DevnetHandle) -> None:
    devnet = chain_snapshot
    client = devnet.client
    deal = _match(devnet, appprice=APP_PRICE, workerpoolprice=POOL_PRICE)
    taskid = deal.taskids()[0]
    requester = devnet.address("requester")
    actions.initialize(devnet.wallet("scheduler"), deal.dealid, deal.bot_first)
    with pytest.raises(TransactionReverted, match="final deadline .* has not been reached"):
        actions.claim(devnet.wallet("requester"), taskid)
    before = client.view_account(requester)
    devnet.increase_time(10 * 300 + 1)  # category XS: finalDeadline = start + 10 * 300
    actions.claim(devnet.wallet("requester"), taskid)
    assert client.view_task(taskid).status == ChainTaskStatus.FAILED
    after = client.view_account(requester)
    assert after.stake - before.stake == APP_PRICE + POOL_PRICE
    assert before.locked - after.locked == APP_PRICE + POOL_PRICE


def test_concurrent_sends_from_one_account_all_land(devnet: DevnetHandle) -> None:
    # Given 20 threads sharing one account, When each deposits 1 nRLC at once
    wallet = devnet.wallet("requester")
    before = devnet.client.view_account(wallet.address).stake
    receipts: list[object] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            receipts.append(actions.deposit(devnet.client.wallet(devnet.key("requester")), 1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then all 20 land, with 20 distinct transactions, and no nonce clash
    assert errors == []
    assert len({r.tx_hash for r in receipts}) == 20  # type: ignore[attr-defined]
    assert devnet.client.view_account(wallet.address).stake == before + 20


def test_a_client_counts_its_requests_and_transactions_and_reads_a_deal_once(
    chain_snapshot: DevnetHandle,
) -> None:
    # Given a deal, and a worker with a chain client of its own
    devnet = chain_snapshot
    deal = _match(devnet)
    taskid = deal.taskids()[0]
    actions.initialize(devnet.wallet("scheduler"), deal.dealid, deal.bot_first)
    client = ChainClient(devnet.client.rpc_url, devnet.info["hub"])
    worker = client.wallet(devnet.worker_key(1))
    # When it reads the deal twice and contributes and finalizes
    first = client.view_deal(deal.dealid)
    assert client.view_deal(deal.dealid) is first
    missing = client.view_deal("0x" + "00" * 31 + "01")  # no such deal: never remembered
    assert not missing.exists
    auth = sign_authorization(devnet.key("scheduler"), worker.address, taskid)
    actions.contribute_and_finalize(worker, taskid, DIGEST, b"link", auth)
    client.view_deal("0x" + "00" * 31 + "01")
    # Then its usage says what went over the wire: one eth_call per read of the deal that
    # does not exist and one for the deal, one estimate, one transaction
    usage = client.usage()
    assert usage["transactions"] == {"contributeAndFinalize": 1}
    calls = usage["calls"]
    assert calls["eth_call"] == 3
    assert calls["eth_estimateGas"] == 1 and calls["eth_sendRawTransaction"] == 1
    assert calls["eth_getTransactionReceipt"] >= 1


def test_the_hot_reads_decode_what_web3_s_contract_machinery_decodes(
    chain_snapshot: DevnetHandle,
) -> None:
    # (viewTask and viewContribution skip web3's per-call ABI work: same values, same shapes)
    devnet = chain_snapshot
    client = devnet.client
    worker = devnet.worker_wallet(0)
    deal = _match(devnet, appprice=APP_PRICE, workerpoolprice=POOL_PRICE)
    taskid = deal.taskids()[0]
    actions.initialize(devnet.wallet("scheduler"), deal.dealid, deal.bot_first)
    auth = sign_authorization(devnet.key("scheduler"), worker.address, taskid)
    actions.contribute(worker, taskid, DIGEST, auth)  # a contributor, a consensus value
    raw = bytes.fromhex(taskid[2:])
    by_web3 = client.hub.functions.viewTask(raw).call()
    assert client._read("viewTask", raw) == tuple(by_web3)
    assert client.view_task(taskid) == Task.from_chain(taskid, by_web3)
    assert client.view_task(taskid).contributors == (worker.address,)
    contribution = client.hub.functions.viewContribution(raw, worker.address).call()
    assert client.view_contribution(taskid, worker.address) == Contribution.from_chain(contribution)
    assert client.view_contribution(taskid, worker.address).status == ContributionStatus.CONTRIBUTED
    # a task that does not exist reads as zeros, as through web3
    unknown = "0x" + "77" * 32
    assert client.view_task(unknown) == Task.from_chain(
        unknown, client.hub.functions.viewTask(bytes.fromhex("77" * 32)).call()
    )
