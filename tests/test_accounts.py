"""Token mode as on Arbitrum, native mode beside it, and the operator's accounts: the devnet
PoCo in token mode (Arbitrum's facets, an RLC ERC-20), deposits through the token by both
paths, withdrawals, refusals before anything is sent, `workerpool account show|deposit|
withdraw` in both modes, and every service refusing a node of another chain."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result
from devnet_fixtures import DevnetHandle
from eth_abi import decode

from cli.api import check_node
from cli.main import main
from poco import actions, funds
from poco.chain import ChainClient
from poco.errors import InsufficientFunds, NetworkMismatch
from pool.settings import CHAINS, Settings
from pool.wallets import checked_chain_client

pytestmark = pytest.mark.devnet

RLC = 10**9
FACETS_SELECTOR = "0x7a0ed627"  # DiamondLoupe facets()


def _nonce(devnet: DevnetHandle, address: str) -> int:
    return int(devnet.client.eth.get_transaction_count(address))


# ---- the token-mode devnet ------------------------------------------------------------------
def test_the_devnet_runs_poco_as_arbitrum_does(devnet: DevnetHandle) -> None:
    client = devnet.client
    # token mode: the hub escrows the devnet's RLC, as devnet.json says
    assert devnet.info["mode"] == "token" == client.mode
    assert client.token_address() == devnet.info["rlc"]
    rlc = client.rlc()
    assert rlc.functions.decimals().call() == 9 and rlc.functions.symbol().call() == "RLC"
    # Arbitrum's routing: 3 base facets + 11 PoCo facets (token escrow, no Boost), 98 selectors
    raw = client.eth.call({"to": client.hub_address, "data": FACETS_SELECTOR})
    (facets,) = decode(["(address,bytes4[])[]"], raw)
    assert len(facets) == 14 and sum(len(selectors) for _, selectors in facets) == 98
    # an unknown selector, a plain coin transfer and the native deposit() all revert
    sender = devnet.address("requester")
    for tx in (
        {"data": "0x12345678"},
        {"value": 1},
        {"data": client.native_hub().functions.deposit()._encode_transaction_data(), "value": 1},
    ):
        with pytest.raises(Exception, match="fallback-disabled"):
            client.eth.call({"to": client.hub_address, "from": sender, **tx})
    # and the devnet preset names this very deployment (a fresh anvil: the same addresses)
    preset = CHAINS["devnet"]
    assert (client.chain_id, client.hub_address, devnet.info["rlc"]) == (
        preset.chain_id,
        preset.hub,
        preset.rlc,
    )


@pytest.mark.parametrize("via", ["approveAndCall", "approve"])
def test_a_deposit_moves_rlc_from_the_wallet_to_the_stake(
    chain_snapshot: DevnetHandle, via: str
) -> None:
    devnet = chain_snapshot
    wallet = devnet.worker_wallet(5)
    before = funds.balances(devnet.client, wallet.address)
    steps: list[str] = []
    receipt = actions.deposit(wallet, 7 * RLC, via=via, progress=steps.append)
    after = funds.balances(devnet.client, wallet.address)
    assert after.wallet_nrlc == before.wallet_nrlc - 7 * RLC
    assert after.stake == before.stake + 7 * RLC and after.locked == before.locked
    assert after.allowance == 0  # the hub took exactly what it was allowed
    assert receipt.status == 1 and steps[-1].startswith("deposited in block")
    sent = ["RLC.approve(hub, 7 RLC)", "hub.deposit(7 RLC)"] if via == "approve" else []
    assert [s for s in steps if s in sent] == sent


def test_a_withdrawal_gives_the_rlc_back(chain_snapshot: DevnetHandle) -> None:
    devnet = chain_snapshot
    wallet = devnet.worker_wallet(6)
    before = funds.balances(devnet.client, wallet.address)
    actions.withdraw(wallet, 30 * RLC)
    after = funds.balances(devnet.client, wallet.address)
    assert after.stake == before.stake - 30 * RLC
    assert after.wallet_nrlc == before.wallet_nrlc + 30 * RLC


def test_short_funds_are_refused_before_anything_is_sent(devnet: DevnetHandle) -> None:
    wallet = devnet.worker_wallet(7)
    have = funds.balances(devnet.client, wallet.address)
    nonce = _nonce(devnet, wallet.address)
    # more RLC than the wallet holds: the faucet RLC would fail without a reason
    in_wallet = funds.format_rlc(have.wallet_nrlc)
    for via in ("approveAndCall", "approve"):
        with pytest.raises(InsufficientFunds, match=f"exceeds the wallet balance.*{in_wallet} RLC"):
            actions.deposit(wallet, have.wallet_nrlc + 1, via=via)
    # more than the free stake
    staked = funds.format_rlc(have.stake)
    with pytest.raises(InsufficientFunds, match=f"exceeds the free stake.*{staked} RLC deposited"):
        actions.withdraw(wallet, have.stake + 1)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="must be positive"):
            actions.deposit(wallet, bad)
    # nothing was sent, nothing moved
    assert _nonce(devnet, wallet.address) == nonce
    assert funds.balances(devnet.client, wallet.address) == have


def test_the_gas_check_follows_the_balance(chain_snapshot: DevnetHandle) -> None:
    devnet = chain_snapshot
    address = devnet.accounts["workers"][8]["address"]
    budget = 10 * 10**9  # 10 gwei: one transaction of 1,000,000 gas costs 0.01 ETH
    for wei, transactions, empty, low in (
        (10**18, 100, False, False),
        (5 * 10**16, 5, False, True),
        (10**16 - 1, 0, True, True),
        (0, 0, True, True),
    ):
        devnet.rpc("anvil_setBalance", [address, hex(wei)])
        gas = funds.gas_check(devnet.client, address, budget)
        assert (gas.wei, gas.transactions, gas.empty, gas.low) == (wei, transactions, empty, low)
    assert "gas balance is empty" in gas.describe(address) and "please refill" in gas.describe(
        address
    )


# ---- workerpool account, token mode -----------------------------------------------------------
def _env(devnet: DevnetHandle, **extra: str | None) -> dict[str, str | None]:
    return {
        "IEXEC_CHAIN": None,
        "IEXEC_PRIVATE_CHAIN_ADDRESS": devnet.info["rpc_url"],
        "IEXEC_HUB_ADDRESS": devnet.info["hub"],
        "IEXEC_CHAIN_ID": str(devnet.info["chain_id"]),
        "WORKERPOOL_DEVNET": "1",
        "IEXEC_CORE_WALLET_PRIVATE_KEY": devnet.key("scheduler"),
        "IEXEC_WORKER_WALLET_PRIVATE_KEY": None,
        "IEXEC_WORKER_MNEMONIC": None,
        **extra,
    }


def _cli(env: dict[str, str | None], *args: str) -> Result:
    return CliRunner().invoke(main, ["account", *args], env=env, catch_exceptions=False)


def test_account_commands_in_token_mode(chain_snapshot: DevnetHandle) -> None:
    devnet = chain_snapshot
    worker = devnet.accounts["workers"][9]
    start = funds.balances(devnet.client, worker["address"])
    wallet, stake = start.wallet_nrlc, start.stake
    env = _env(devnet, IEXEC_WORKER_WALLET_PRIVATE_KEY=worker["private_key"])
    # show: the scheduler's and the worker's wallets, each with gas, wallet RLC, stake, locked
    shown = _cli(env, "show")
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert f"(RLC {devnet.info['rlc']})" in out
    assert (
        f"scheduler {devnet.address('scheduler')}" in out and f"worker {worker['address']}" in out
    )
    assert (
        f"  wallet     {funds.format_rlc(wallet)} RLC\n"
        f"  deposited  {funds.format_rlc(stake)} RLC (free stake)\n"
        f"  locked     {funds.format_rlc(start.locked)} RLC"
    ) in out
    # both wallets are set: a deposit must say whose
    ambiguous = _cli(env, "deposit", "1", "RLC")
    assert ambiguous.exit_code == 1 and "--wallet scheduler|worker" in ambiguous.output
    # deposit 2.5 RLC through approve + deposit, with each step shown
    done = _cli(env, "deposit", "2.5", "RLC", "--wallet", "worker", "--via", "approve")
    assert done.exit_code == 0, done.output
    assert "RLC.approve(hub, 2.5 RLC)" in done.output and "hub.deposit(2.5 RLC)" in done.output
    assert f"stake now {funds.format_rlc(stake + 2_500_000_000)} RLC" in done.output
    # then 500000000 nRLC (the default unit) through approveAndCall
    done = _cli(env, "deposit", "500000000", "--wallet", "worker")
    assert done.exit_code == 0 and "RLC.approveAndCall(hub, 0.5 RLC)" in done.output
    assert f"stake now {funds.format_rlc(stake + 3 * RLC)} RLC" in done.output
    # short funds: a clear error, exit 1, nothing sent
    nonce = _nonce(devnet, worker["address"])
    short = _cli(env, "deposit", str(wallet), "nRLC", "--wallet", "worker")
    assert short.exit_code == 1 and "exceeds the wallet balance" in short.output
    assert f"has {funds.format_rlc(wallet - 3 * RLC)} RLC in the wallet" in short.output
    short = _cli(env, "withdraw", str(stake + 3 * RLC + 1), "--wallet", "worker")
    assert short.exit_code == 1 and "exceeds the free stake" in short.output
    bad = _cli(env, "deposit", "1.5", "--wallet", "worker")
    assert bad.exit_code == 1 and "nRLC are whole numbers" in bad.output
    assert _nonce(devnet, worker["address"]) == nonce
    # withdraw
    done = _cli(env, "withdraw", "3", "RLC", "--wallet", "worker")
    assert done.exit_code == 0 and f"stake now {funds.format_rlc(stake)} RLC" in done.output
    b = funds.balances(devnet.client, worker["address"])
    assert (b.wallet_nrlc, b.stake) == (wallet, stake)
    # a wallet without gas: the deposit is refused before sending, show says so
    devnet.rpc("anvil_setBalance", [worker["address"], "0x0"])
    dry = _cli(env, "deposit", "1", "RLC", "--wallet", "worker")
    assert dry.exit_code == 1 and "too little for 1 transaction(s)" in dry.output
    shown = _cli(env, "show", worker["address"])
    assert "error: gas balance is empty" in shown.output


def test_account_show_of_mnemonic_workers_and_addresses(devnet: DevnetHandle) -> None:
    from devnet.network import FIRST_WORKER_INDEX, PUBLIC_TEST_MNEMONIC

    env = _env(
        devnet,
        IEXEC_CORE_WALLET_PRIVATE_KEY=None,
        IEXEC_WORKER_MNEMONIC=PUBLIC_TEST_MNEMONIC,
        WORKERPOOL_WORKER_INDEX_FIRST=str(FIRST_WORKER_INDEX),
        WORKERPOOL_WORKER_INDEX_COUNT="3",
    )
    shown = _cli(env, "show")
    assert shown.exit_code == 0, shown.output
    for i in range(3):
        address = devnet.accounts["workers"][i]["address"]
        assert f"worker index {FIRST_WORKER_INDEX + i} {address}" in shown.output
    # one index to spend from must be named
    refused = _cli(env, "withdraw", "1", "RLC")
    assert refused.exit_code == 1 and "--index N" in refused.output
    # any address, as JSON
    shown = _cli(env, "show", devnet.address("requester"), "--json")
    assert shown.exit_code == 0
    assert '"walletNrlc": 5000000000000' in shown.output and '"mode": "token"' in shown.output
    assert _cli(env, "show", "0x123").exit_code == 1


# ---- native mode -------------------------------------------------------------------------------
def test_account_commands_in_native_mode(native_devnet: DevnetHandle) -> None:
    devnet = native_devnet
    client = devnet.client
    assert devnet.info["mode"] == "native" == client.mode
    assert int(devnet.info["rlc"], 16) == 0
    worker = devnet.accounts["workers"][9]
    stake = client.view_account(worker["address"]).stake
    env = _env(devnet, IEXEC_CORE_WALLET_PRIVATE_KEY=None)
    env["IEXEC_WORKER_WALLET_PRIVATE_KEY"] = worker["private_key"]
    shown = _cli(env, "show")
    assert shown.exit_code == 0, shown.output
    assert "native mode: stakes in the coin" in shown.output and "  wallet " not in shown.output
    assert f"  deposited  {funds.format_rlc(stake)} RLC (free stake)" in shown.output
    wei = client.native_balance(worker["address"])
    done = _cli(env, "deposit", "4", "RLC")
    assert done.exit_code == 0, done.output
    assert "deposit(): sending 4 RLC as 4000000000000000000 wei" in done.output
    assert f"stake now {funds.format_rlc(stake + 4 * RLC)} RLC" in done.output
    assert client.native_balance(worker["address"]) < wei - 4 * 10**18  # and the gas
    done = _cli(env, "withdraw", str(stake + 4 * RLC))
    assert done.exit_code == 0 and "stake now 0 RLC" in done.output
    short = _cli(env, "withdraw", "1", "nRLC")
    assert short.exit_code == 1 and "exceeds the free stake" in short.output
    # a deposit above what the wallet holds
    short = _cli(env, "deposit", str(10**13), "RLC")
    assert short.exit_code == 1 and "exceeds the wallet balance" in short.output
    # put the stake back for the other tests of this chain
    assert _cli(env, "deposit", str(stake)).exit_code == 0


# ---- every service checks the chain ------------------------------------------------------------
@pytest.fixture
def settings(devnet: DevnetHandle) -> Iterator[Settings]:
    yield Settings(
        chain_rpc_url=devnet.info["rpc_url"],
        hub_address=devnet.info["hub"],
        pool_address=devnet.info["workerpool"],
        devnet=True,
        core_wallet_private_key=devnet.key("scheduler"),
        worker_wallet_private_key=devnet.worker_key(0),
        mongo_url="mongomock://",
    )


def _mismatches(settings: Settings) -> list[tuple[Settings, str]]:
    return [
        (
            dataclasses.replace(settings, chain="arbitrum-mainnet", chain_id=0, hub_address=None),
            r"IEXEC_CHAIN=arbitrum-mainnet \(chain 42161\) but the node at http://127.0.0.1:"
            r"\d+ \(IEXEC_PRIVATE_CHAIN_ADDRESS\) reports chain 31337 \(devnet\)",
        ),
        (
            dataclasses.replace(settings, chain_id=421614),
            "IEXEC_CHAIN_ID=421614 but the node .* reports chain 31337",
        ),
        (
            dataclasses.replace(settings, hub_address=CHAINS["arbitrum-mainnet"].hub),
            "no contract at IEXEC_HUB_ADDRESS 0x098bFCb1E50ebcA0BaA92C12eA0c3F045A1aD9f0 "
            "on chain 31337",
        ),
    ]


def test_every_service_stops_on_a_node_of_another_chain(settings: Settings) -> None:
    from scheduler.service import build
    from testing.celery import fake_messenger
    from workers.tasks import build_node

    messages, _ = fake_messenger()
    starts: dict[str, Any] = {
        "scheduler": lambda s: build(s, messages),
        "worker": lambda s: build_node(s, s.worker_wallet_private_key, messages),
        "api": check_node,
    }
    for wrong, message in _mismatches(settings):
        for start in starts.values():
            with pytest.raises(NetworkMismatch, match=message):
                start(wrong)
    # the right chain, named by the preset, starts
    right = dataclasses.replace(settings, chain="devnet", hub_address=None)
    assert right.chain_id == 31337 and right.hub_address == settings.hub_address
    assert isinstance(checked_chain_client(right), ChainClient)
    check_node(right)


def test_the_api_command_refuses_another_chain_and_starts_when_the_node_is_down(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from devnet_fixtures import free_port

    runner = CliRunner()
    env = {
        "IEXEC_PRIVATE_CHAIN_ADDRESS": settings.chain_rpc_url,
        "IEXEC_CHAIN": "arbitrum-sepolia-testnet",
        "IEXEC_HUB_ADDRESS": None,
        "IEXEC_CHAIN_ID": None,
    }
    refused = runner.invoke(main, ["api"], env=env)
    assert refused.exit_code == 1
    assert "IEXEC_CHAIN=arbitrum-sepolia-testnet (chain 421614)" in refused.output
    # a node that does not answer: the API starts all the same (/healthz says the chain is down)
    served: list[Settings] = []
    monkeypatch.setattr("cli.api.serve", lambda s, app, threads=None: served.append(s))
    down = {**env, "IEXEC_PRIVATE_CHAIN_ADDRESS": f"http://127.0.0.1:{free_port()}"}
    started = runner.invoke(main, ["api"], env=down)
    assert started.exit_code == 0, started.output
    assert served and served[0].chain_id == 421614


def test_the_scheduler_warns_at_start_of_low_gas_and_of_orders_its_stake_cannot_back(
    chain_snapshot: DevnetHandle, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from orders.store import OrderStore
    from scheduler.service import build, funds_warnings
    from testing.celery import fake_messenger

    devnet = chain_snapshot
    messages, _ = fake_messenger()
    # Given a funded scheduler with no order: nothing to say
    scheduler = build(settings, messages)
    assert funds_warnings(scheduler.ctx) == []
    # When an order it published needs more pool stake than it has free
    owner = devnet.address("scheduler")
    stake = devnet.client.view_account(owner).stake
    OrderStore(scheduler.store.db).orders.insert_one(
        {
            "orderHash": "0x" + "0e" * 32,
            "status": "open",
            "keys": {"signer": owner.lower()},
            "order": {"workerpoolprice": stake},
            "remaining": 4,  # 30 % x 4 = 1.2 x the stake
        }
    )
    (warning,) = funds_warnings(scheduler.ctx)
    assert "does not cover its 1 published order(s)" in warning
    assert f"deposit {funds.format_rlc(stake * 120 // 100 - stake)} RLC more" in warning
    # And a scheduler starting with too little gas says so in its log
    devnet.rpc("anvil_setBalance", [owner, hex(10**15)])
    with caplog.at_level("WARNING", logger="scheduler.service"):
        build(dataclasses.replace(settings, gas_price_budget_gwei=1.0), messages)
    assert f"scheduler wallet: gas balance is very low: {owner} holds 0.001 ETH" in caplog.text


def test_register_pool_creates_the_workerpool_once_and_says_where_to_start(
    chain_snapshot: DevnetHandle,
) -> None:
    devnet = chain_snapshot
    env = _env(devnet)
    runner = CliRunner()
    first = runner.invoke(main, ["register-pool", "--description", "a test pool"], env=env)
    assert first.exit_code == 0, first.output
    address = first.output.split()[1]
    block = devnet.client.block_number()
    assert f"  POOL_ADDRESS={address}\n  IEXEC_START_BLOCK_NUMBER={block}\n" in first.output
    assert devnet.client.workerpool_owner(address) == devnet.address("scheduler")
    again = runner.invoke(main, ["register-pool", "--description", "a test pool"], env=env)
    assert again.exit_code == 0 and f"workerpool {address} already exists" in again.output
    assert devnet.client.block_number() == block  # nothing sent
    # the devnet's own pool is the one its description names
    devnet_pool = runner.invoke(
        main, ["register-pool", "--description", "workerpool devnet pool"], env=env
    )
    assert f"workerpool {devnet.info['workerpool']} already exists" in devnet_pool.output
