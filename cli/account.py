"""``workerpool account show|deposit|withdraw``: the operator's wallets and PoCo accounts.

Every wallet of a pool spends two things: the chain's coin, for gas, and RLC staked in its
PoCo account: the scheduler (the workerpool owner) stakes 30 % of the price of every task it
sells, a worker node the deal's worker stake on each contribution (none through
contributeAndFinalize). ``show`` prints both, for the wallets of the settings or any address;
``deposit`` and ``withdraw`` move RLC between the wallet and the PoCo account, in token mode
(Arbitrum: the RLC ERC-20, through ``approveAndCall`` or ``approve`` + ``deposit``) and in
native mode (the coin itself). Each checks what it spends before sending anything and says
what is missing.
"""

from __future__ import annotations

import json
from typing import Any

import click

from cli.errors import CommandError, refusals
from pool.settings import Settings

MAX_MNEMONIC_SHOWN = 20
WALLETS = ("scheduler", "worker")


def _settings() -> Settings:
    with refusals():
        return Settings.from_env()


def _client(settings: Settings) -> Any:
    from pool.wallets import checked_chain_client

    with refusals():
        return checked_chain_client(settings)


def _configured(settings: Settings) -> dict[str, bool]:
    return {
        "scheduler": bool(settings.core_wallet_path or settings.core_wallet_private_key),
        "worker": bool(
            settings.worker_wallet_path
            or settings.worker_wallet_private_key
            or settings.worker_mnemonic
            or settings.worker_mnemonic_file
        ),
    }


def _worker_keys(settings: Settings, indexes: tuple[int, ...]) -> list[tuple[str, str]]:
    """(label, private key) of the worker wallets of the settings: the keystore or devnet
    key, else the mnemonic's indexes (``indexes``, or the first ones the nodes may lease)."""
    from pool.wallets import worker_key
    from workers.identity import derive, mnemonic_of

    if settings.worker_wallet_path or settings.worker_wallet_private_key:
        return [("worker", worker_key(settings))]
    mnemonic = mnemonic_of(settings)
    if not mnemonic:
        return []
    first, count = settings.worker_index_first, settings.worker_index_count
    chosen = indexes or tuple(range(first, first + min(count, MAX_MNEMONIC_SHOWN)))
    return [(f"worker index {i}", derive(mnemonic, i)) for i in chosen]


def _wallet_key(settings: Settings, which: str | None, index: int | None) -> tuple[str, str]:
    """(label, private key) of the wallet a deposit or withdrawal spends from."""
    from pool.wallets import scheduler_key

    configured = [name for name, ok in _configured(settings).items() if ok]
    if which is None:
        if len(configured) != 1:
            found = " and ".join(configured) if configured else "no wallet"
            raise CommandError(
                f"the settings hold {found}: say which to use with --wallet scheduler|worker"
            )
        which = configured[0]
    with refusals():
        if which == "scheduler":
            return "scheduler", scheduler_key(settings)
        keys = _worker_keys(settings, (index,) if index is not None else ())
    if not keys:
        raise CommandError(
            "no worker wallet in the settings (IEXEC_WORKER_WALLET_PATH or IEXEC_WORKER_MNEMONIC)"
        )
    if len(keys) > 1:
        raise CommandError("the worker wallets come from a mnemonic: say which with --index N")
    return keys[0]


@click.group("account")
def account() -> None:
    """The pool's wallets: gas, RLC in the wallet, RLC deposited (stake) and locked."""


@account.command("show")
@click.argument("addresses", nargs=-1)
@click.option(
    "--index",
    "indexes",
    type=click.IntRange(0),
    multiple=True,
    help="With IEXEC_WORKER_MNEMONIC: this derivation index (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (amounts in wei and nRLC).")
def account_show(addresses: tuple[str, ...], indexes: tuple[int, ...], as_json: bool) -> None:
    """Show ADDRESSES, or the wallets of the settings: the scheduler's and the worker's."""
    from eth_account import Account
    from eth_utils import is_address, to_checksum_address

    from poco import funds

    settings = _settings()
    targets: list[tuple[str, str]] = []
    for address in addresses:
        if not is_address(address):
            raise CommandError(f"{address!r} is not an Ethereum address")
        targets.append(("address", to_checksum_address(address)))
    if not addresses:
        from pool.wallets import scheduler_key

        with refusals():
            if _configured(settings)["scheduler"]:
                targets.append(("scheduler", Account.from_key(scheduler_key(settings)).address))
            for label, key in _worker_keys(settings, indexes):
                targets.append((label, Account.from_key(key).address))
    if not targets:
        raise CommandError(
            "no wallet in the settings (IEXEC_CORE_WALLET_*, IEXEC_WORKER_WALLET_* or "
            "IEXEC_WORKER_MNEMONIC): give addresses"
        )
    client = _client(settings)
    budget = int(settings.gas_price_budget_gwei * 10**9)
    with refusals():
        rows = [
            (label, funds.balances(client, address), funds.gas_check(client, address, budget))
            for label, address in targets
        ]
        token = client.token_address()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "chainId": client.chain_id,
                    "hub": client.hub_address,
                    "mode": client.mode,
                    "rlc": token,
                    "accounts": [
                        {
                            "label": label,
                            "address": b.address,
                            "wei": b.wei,
                            "gasTransactions": g.transactions,
                            "walletNrlc": b.wallet_nrlc if b.mode == "token" else None,
                            "stake": b.stake,
                            "locked": b.locked,
                            "allowance": b.allowance,
                        }
                        for label, b, g in rows
                    ],
                },
                indent=2,
            )
        )
        return
    what = f"RLC {token}" if client.mode == "token" else "native mode: stakes in the coin"
    click.echo(f"chain {client.chain_id}, hub {client.hub_address} ({what})")
    for label, b, gas in rows:
        click.echo(f"{label} {b.address}")
        click.echo(
            f"  gas        {funds.format_eth(b.wei)} ETH "
            f"({_transactions(gas.transactions)} of 1,000,000 gas at "
            f"{funds.format_gwei(gas.price)} gwei)"
        )
        if b.mode == "token":
            click.echo(f"  wallet     {funds.format_rlc(b.wallet_nrlc)} RLC")
        click.echo(f"  deposited  {funds.format_rlc(b.stake)} RLC (free stake)")
        click.echo(f"  locked     {funds.format_rlc(b.locked)} RLC")
        if b.allowance:
            click.echo(f"  allowance  {funds.format_rlc(b.allowance)} RLC the hub may take")
        if gas.empty:
            click.echo(f"  error: {gas.describe(b.address)}")
        elif gas.low:
            click.echo(f"  warning: {gas.describe(b.address)}")


def _transactions(n: int) -> str:
    return "over 10^9 transactions" if n >= 10**9 else f"{n} transaction(s)"


WALLET_OPTION = click.option(
    "--wallet",
    "which",
    type=click.Choice(WALLETS),
    default=None,
    help="Whose account: the scheduler's (IEXEC_CORE_WALLET_*) or the worker's "
    "(IEXEC_WORKER_WALLET_* or IEXEC_WORKER_MNEMONIC with --index); needed when both are set.",
)
INDEX_OPTION = click.option(
    "--index", type=click.IntRange(0), default=None, help="Mnemonic index of the worker wallet."
)


@account.command("deposit")
@click.argument("amount")
@click.argument("unit", default="nRLC")
@WALLET_OPTION
@INDEX_OPTION
@click.option(
    "--via",
    type=click.Choice(("approveAndCall", "approve")),
    default="approveAndCall",
    show_default=True,
    help="Token mode: one RLC.approveAndCall (as the iExec SDK), or RLC.approve then "
    "hub.deposit (two transactions).",
)
def account_deposit(amount: str, unit: str, which: str | None, index: int | None, via: str) -> None:
    """Deposit AMOUNT [UNIT] (nRLC by default, or RLC) from the wallet into its PoCo account."""
    from poco import actions, funds

    nrlc = _amount(amount, unit)
    settings = _settings()
    label, key = _wallet_key(settings, which, index)
    client = _client(settings)
    wallet = client.wallet(key)
    _check_gas(settings, client, wallet.address, 2 if via == "approve" else 1, nrlc)
    click.echo(f"{label} {wallet.address}: depositing {funds.format_rlc(nrlc)} RLC")
    with refusals():
        actions.deposit(wallet, nrlc, via=via, progress=lambda step: click.echo(f"  {step}"))
        after = client.view_account(wallet.address)
    click.echo(
        f"  stake now {funds.format_rlc(after.stake)} RLC ({funds.format_rlc(after.locked)} locked)"
    )


@account.command("withdraw")
@click.argument("amount")
@click.argument("unit", default="nRLC")
@WALLET_OPTION
@INDEX_OPTION
def account_withdraw(amount: str, unit: str, which: str | None, index: int | None) -> None:
    """Withdraw AMOUNT [UNIT] (nRLC by default, or RLC) of free stake back to the wallet."""
    from poco import actions, funds

    nrlc = _amount(amount, unit)
    settings = _settings()
    label, key = _wallet_key(settings, which, index)
    client = _client(settings)
    wallet = client.wallet(key)
    _check_gas(settings, client, wallet.address, 1, 0)
    click.echo(f"{label} {wallet.address}: withdrawing {funds.format_rlc(nrlc)} RLC")
    with refusals():
        actions.withdraw(wallet, nrlc, progress=lambda step: click.echo(f"  {step}"))
        after = client.view_account(wallet.address)
    click.echo(
        f"  stake now {funds.format_rlc(after.stake)} RLC ({funds.format_rlc(after.locked)} locked)"
    )


def _amount(amount: str, unit: str) -> int:
    from poco.funds import parse_amount

    try:
        return parse_amount(amount, unit)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def _check_gas(settings: Settings, client: Any, address: str, transactions: int, nrlc: int) -> None:
    """Refuse before sending when the wallet cannot pay for ``transactions`` (in native mode
    after taking the deposit out of the same coin)."""
    from poco import funds

    with refusals():
        gas = funds.gas_check(client, address, int(settings.gas_price_budget_gwei * 10**9))
        native = client.mode == "native"
    spent = nrlc * 10**9 if native else 0
    if gas.wei < spent:
        raise CommandError(
            f"deposit of {funds.format_rlc(nrlc)} RLC exceeds the wallet balance: {address} "
            f"has {funds.format_rlc(gas.wei // 10**9)} RLC worth of the native coin"
        )
    need = transactions * gas.transaction_cost
    if gas.wei - spent < need:
        left = " after the deposit" if spent else ""
        raise CommandError(
            f"{address} holds {funds.format_eth(gas.wei)} ETH: too little{left} for "
            f"{transactions} transaction(s) of up to 1,000,000 gas at "
            f"{funds.format_gwei(gas.price)} gwei ({funds.format_eth(need)} ETH); send it "
            "some of the chain's coin first"
        )


@click.command("register-pool")
@click.option(
    "--description",
    default="workerpool",
    show_default=True,
    help="The pool's description in the registry (with the owner, it fixes the address).",
)
def register_pool(description: str) -> None:
    """Register the workerpool the scheduler wallet owns (once; again: prints its address)."""
    from poco import actions
    from pool.wallets import scheduler_key

    settings = _settings()
    with refusals():
        key = scheduler_key(settings)
    client = _client(settings)
    wallet = client.wallet(key)
    _check_gas(settings, client, wallet.address, 1, 0)
    with refusals():
        address, receipt = actions.create_workerpool(wallet, description)
    if receipt is None:
        click.echo(f"workerpool {address} already exists (owner {wallet.address}, {description!r})")
        click.echo(f"  POOL_ADDRESS={address}")
        return
    click.echo(
        f"workerpool {address} registered in block {receipt.block_number} ({receipt.tx_hash})"
    )
    click.echo(f"  POOL_ADDRESS={address}")
    click.echo(f"  IEXEC_START_BLOCK_NUMBER={receipt.block_number}")
