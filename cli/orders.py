"""``workerpool order …`` and ``workerpool orderbook …``: the iExec SDK's order flow for a pool.

    workerpool order init [--out workerpoolorder.json]     template from the pool's settings
    workerpool order sign [FILE] [--out FILE]              EIP-712, owner wallet, random salt
    workerpool order publish [FILE] [--orderbook URL]      to the pool's orderbook (or another)
    workerpool order unpublish <orderHash> | --all | --last
    workerpool order cancel <orderHash> [--file FILE]      manageWorkerpoolOrder(CLOSE) on chain
    workerpool order show <orderHash>
    workerpool orderbook workerpool [ADDRESS]              published orders, remaining volume

Every command runs the same preflight checks as the orderbook API (:mod:`orders.book`) before
it signs, sends or spends anything, so a mistake is reported here with the field to fix rather
than as a revert when a requester tries to buy the order. The orderbook is reached over HTTP
in the iExec market API's shape, so ``--orderbook`` may point at any market-compatible one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from eth_account import Account
from eth_utils import to_checksum_address
from pymongo.errors import PyMongoError

from cli.errors import REFUSALS, CommandError, refusals
from orders.book import live_nodes_of
from orders.client import OrderbookClient
from orders.rules import (
    UNPUBLISH_ALL,
    UNPUBLISH_LAST,
    UNPUBLISH_ORDERHASH,
    OrderbookError,
    PreflightError,
    check_fleet,
    check_order,
    check_terms,
    parse_order,
    required_stake,
    tag_label,
    template_from_settings,
    verify_order_signature,
    workerpool_owner,
)
from poco import actions
from poco.chain import ChainClient
from poco.errors import PocoError
from poco.orders import WorkerpoolOrder, random_salt
from poco.tags import TagError, encode_tag
from pool.settings import SETTINGS, Settings
from pool.store import connect
from pool.wallets import chain_client, scheduler_key

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "workerpoolorder.json"
DEFAULT_SIGNED = "workerpoolorder.signed.json"
TEMPLATE_FIELDS = (
    "workerpool",
    "workerpoolprice",
    "volume",
    "tag",
    "category",
    "trust",
    "apprestrict",
    "datasetrestrict",
    "requesterrestrict",
)
STILL_VALID = (
    "An unpublished order stays valid on chain: anyone who kept the signed order can still "
    "match it until you cancel it (workerpool order cancel {hash})."
)


# ---- shared plumbing ---------------------------------------------------------------------------
def _settings() -> Settings:
    with refusals():
        return Settings.from_env()


def _client(settings: Settings) -> ChainClient:
    with refusals():
        return chain_client(settings)


def _key(settings: Settings) -> str:
    with refusals():
        return scheduler_key(settings)


def _live_nodes(settings: Settings) -> Callable[[str], int]:
    """Live worker nodes serving a capability, read from the pool's store (MongoDB) only
    when an order's tag needs them (GPU, TEE)."""

    def count(capability: str) -> int:
        try:
            return live_nodes_of(connect(settings), settings)(capability)
        except PyMongoError as exc:
            raise PreflightError(
                "tag",
                f"cannot tell whether live worker nodes serve {capability} tasks: the pool's "
                f"store ({SETTINGS['mongo_host'].env}/{SETTINGS['mongo_url'].env}) does not "
                f"answer: {exc}",
            ) from exc

    return count


def orderbook_url(settings: Settings, override: str | None = None) -> str:
    """``--orderbook``, else WORKERPOOL_ORDERBOOK_URL, else the pool's own API."""
    if override:
        return override.rstrip("/")
    if settings.orderbook_url:
        return settings.orderbook_url.rstrip("/")
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.api_host if settings.api_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.core_port}"


def _orderbook(settings: Settings, override: str | None, client: ChainClient) -> OrderbookClient:
    return OrderbookClient(orderbook_url(settings, override), client.chain_id)


def _read_order(path: Path) -> dict[str, Any]:
    """A workerpool order from a file: the order itself, ``{"workerpoolorder": …}`` or an
    iexec.json-like ``{"order": {"workerpoolorder": …}}``."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CommandError(f"{path} is not JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("order"), dict):
        data = data["order"]
    if isinstance(data, dict) and isinstance(data.get("workerpoolorder"), dict):
        data = data["workerpoolorder"]
    if not isinstance(data, dict):
        raise CommandError(f"{path} does not hold a workerpool order (a JSON object)")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _run(fn: Any) -> Any:
    """Turn the refusals every command shares into ``error: …`` and exit status 1."""
    try:
        return fn()
    except PreflightError as exc:
        raise CommandError(f"preflight check failed: {exc.message}") from exc
    except OrderbookError as exc:
        raise CommandError(exc.message) from exc
    except REFUSALS as exc:
        raise CommandError(str(exc)) from exc


# ---- workerpool order ---------------------------------------------------------------------------
@click.group("order")
def order() -> None:
    """Workerpool orders: sell the pool's capacity (init, sign, publish, unpublish, cancel)."""


@order.command("init")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_TEMPLATE,
    show_default=True,
)
@click.option("--price", type=click.IntRange(0), help="workerpoolprice, nRLC per task.")
@click.option("--volume", type=int, help="Tasks sold by this order.")
@click.option(
    "--tag", help="standard, gpu, or tee,scone / tee,gramine / tee,tdx (WORKERPOOL_TEE_STACK)."
)
@click.option("--category", type=click.IntRange(0))
@click.option("--trust", type=click.IntRange(0))
@click.option("--apprestrict", help="Only this app (default: the zero address, any app).")
@click.option("--datasetrestrict", help="Only this dataset (default: any).")
@click.option("--requesterrestrict", help="Only this requester (default: anyone).")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def order_init(out: Path, force: bool, **overrides: Any) -> None:
    """Write a workerpool order template, filled from the pool's settings, to a JSON file."""
    settings = _settings()
    if out.exists() and not force:
        raise CommandError(f"{out} exists (use --force to overwrite it)")

    def build() -> dict[str, Any]:
        template = template_from_settings(settings).to_dict()
        for name, value in overrides.items():
            if value is not None:
                template["workerpoolprice" if name == "price" else name] = value
        if overrides.get("tag") is not None:
            try:
                template["tag"] = encode_tag(overrides["tag"])
            except TagError as exc:
                raise PreflightError("tag", str(exc)) from exc
        checked = parse_order(template)  # field-level errors name the field
        check_terms(checked, settings.tee_stack)
        return {name: getattr(checked, name) for name in TEMPLATE_FIELDS}

    data = _run(build)
    _write(out, data)
    click.echo(f"wrote {out}: workerpool {data['workerpool']}")
    click.echo(
        f"  {data['volume']} task(s) at {data['workerpoolprice']} nRLC, category "
        f"{data['category']}, trust {data['trust']}, tag {tag_label(data['tag'])}"
    )
    click.echo(f"next: workerpool order sign {out}")


@order.command("sign")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_TEMPLATE)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_SIGNED,
    show_default=True,
)
def order_sign(file: Path, out: Path) -> None:
    """Sign an order (EIP-712, the workerpool owner's wallet, a random salt)."""
    settings = _settings()
    data = _read_order(file)
    client = _client(settings)
    key = _key(settings)

    def sign() -> tuple[WorkerpoolOrder, str, str]:
        unsigned = parse_order(
            {**{k: v for k, v in data.items() if k not in ("salt", "sign")}, "salt": random_salt()}
        )
        wallet = Account.from_key(key).address
        checked = check_order(
            unsigned, client, signer=wallet, signed=False, tee_stack=settings.tee_stack
        )
        check_fleet(unsigned, _live_nodes(settings))
        signed = unsigned.signed(key, client.domain())
        verify_order_signature(signed, checked.order_hash, checked.owner, client)
        return signed, checked.order_hash, checked.owner

    signed, order_hash, owner = _run(sign)
    _write(out, signed.to_dict())
    click.echo(f"signed {file} -> {out}")
    click.echo(f"  orderHash {order_hash}")
    stake = _run(lambda: client.view_account(owner).stake)
    need = required_stake(signed.workerpoolprice, signed.volume)
    if stake < need:
        click.echo(
            f"warning: the owner's stake ({stake} nRLC) does not cover this order's workerpool "
            f"stake ({need} nRLC): the orderbook will refuse it until you deposit more",
            err=True,
        )
    click.echo(f"next: workerpool order publish {out}")


@order.command("publish")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_SIGNED)
@click.option("--orderbook", "orderbook", help="Orderbook URL (default: the pool's own API).")
def order_publish(file: Path, orderbook: str | None) -> None:
    """Publish a signed order to the orderbook."""
    settings = _settings()
    data = _read_order(file)
    client = _client(settings)
    key = _key(settings)

    def publish() -> dict[str, Any]:
        signed = parse_order(data)
        checked = check_order(signed, client, tee_stack=settings.tee_stack)
        check_fleet(signed, _live_nodes(settings))
        wallet = Account.from_key(key).address
        if wallet.lower() != checked.owner.lower():
            raise PreflightError(
                "signer",
                f"the settings' wallet {wallet} is not the order's signer {checked.owner}: it "
                "cannot authorize this publication",
                status=403,
            )
        return _orderbook(settings, orderbook, client).publish(signed.to_dict(), key)

    published = _run(publish)
    click.echo(f"published {published['orderHash']}")
    click.echo(
        f"  remaining {published['remaining']} of {published['order']['volume']} at "
        f"{published['order']['workerpoolprice']} nRLC, status {published['status']}"
    )


@order.command("unpublish")
@click.argument("order_hash", required=False)
@click.option("--all", "all_", is_flag=True, help="Every open order of the pool you published.")
@click.option("--last", is_flag=True, help="Your most recently published open order.")
@click.option("--orderbook", "orderbook", help="Orderbook URL (default: the pool's own API).")
def order_unpublish(order_hash: str | None, all_: bool, last: bool, orderbook: str | None) -> None:
    """Withdraw an order from the orderbook (it stays valid on chain until cancelled)."""
    if sum(bool(x) for x in (order_hash, all_, last)) != 1:
        raise CommandError("give an orderHash, or --all, or --last")
    settings = _settings()
    client = _client(settings)
    key = _key(settings)
    book = _orderbook(settings, orderbook, client)
    if order_hash:
        hashes = _run(lambda: book.unpublish(key, UNPUBLISH_ORDERHASH, order_hash=order_hash))
    else:
        with refusals():
            settings.require("pool_address")
        target = UNPUBLISH_ALL if all_ else UNPUBLISH_LAST
        hashes = _run(lambda: book.unpublish(key, target, workerpool=str(settings.pool_address)))
    for h in hashes:
        click.echo(f"unpublished {h}")
    click.echo(STILL_VALID.format(hash=hashes[0] if len(hashes) == 1 else "<orderHash>"))


@order.command("cancel")
@click.argument("order_hash")
@click.option(
    "--file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The signed order (default: fetched from the orderbook).",
)
@click.option("--orderbook", "orderbook", help="Orderbook URL (default: the pool's own API).")
def order_cancel(order_hash: str, file: Path | None, orderbook: str | None) -> None:
    """Close an order on chain (manageWorkerpoolOrder CLOSE): nobody can match it any more."""
    settings = _settings()
    client = _client(settings)
    key = _key(settings)
    data = (
        _read_order(file)
        if file
        else _run(lambda: _orderbook(settings, orderbook, client).order(order_hash))["order"]
    )

    def cancel() -> str:
        signed = parse_order(data)
        if signed.hash(client.domain()).lower() != order_hash.lower():
            raise PreflightError("order", f"this order's hash is not {order_hash}")
        wallet = client.wallet(key)
        owner = workerpool_owner(client, signed.workerpool)
        if wallet.address.lower() != owner.lower():
            raise PreflightError(
                "signer",
                f"wallet {wallet.address} does not own workerpool {signed.workerpool} "
                f"(owner {owner}): only the owner can close its orders",
                status=403,
            )
        consumed = client.view_consumed(order_hash)
        if consumed >= signed.volume:
            raise PreflightError(
                "order", "nothing to cancel: no volume left on chain (filled or already cancelled)"
            )
        receipt = actions.manage_order(wallet, signed, actions.CLOSE)
        return receipt.tx_hash

    tx_hash = _run(cancel)
    click.echo(f"cancelled {order_hash} on chain (tx {tx_hash})")
    click.echo("  its remaining volume is now 0: matchOrders with it reverts")


@order.command("show")
@click.argument("order_hash")
@click.option("--orderbook", "orderbook", help="Orderbook URL (default: the pool's own API).")
@click.option("--json", "as_json", is_flag=True, help="Print the orderbook's JSON.")
def order_show(order_hash: str, orderbook: str | None, as_json: bool) -> None:
    """Show a published order: status, remaining volume (on chain), terms."""
    settings = _settings()
    client = _client(settings)
    data = _run(lambda: _orderbook(settings, orderbook, client).order(order_hash))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    terms = data["order"]
    remaining = _chain_remaining(client, order_hash, int(terms["volume"]), data["remaining"])
    click.echo(f"order {data['orderHash']} ({data['status']})")
    click.echo(f"  workerpool   {terms['workerpool']} (signer {data['signer']})")
    click.echo(f"  price        {terms['workerpoolprice']} nRLC per task")
    click.echo(f"  remaining    {remaining} of {terms['volume']}")
    click.echo(f"  category     {terms['category']}   trust {terms['trust']}")
    click.echo(f"  tag          {tag_label(terms['tag'])} ({terms['tag']})")
    for name in ("apprestrict", "datasetrestrict", "requesterrestrict"):
        if int(terms[name], 16):
            click.echo(f"  {name:<12} {terms[name]}")
    click.echo(f"  published    {data['publicationTimestamp']}")
    for deal in data.get("deals", []):
        click.echo(f"  deal         {deal['dealid']} ({deal['volume']} task(s))")


def _chain_remaining(client: ChainClient, order_hash: str, volume: int, fallback: int) -> int:
    """volume - viewConsumed, read now; the orderbook's figure when the chain does not answer."""
    try:
        return max(0, volume - client.view_consumed(order_hash))
    except PocoError as exc:
        log.warning("remaining of %s from the orderbook (chain: %s)", order_hash, exc)
        return fallback


# ---- workerpool orderbook -------------------------------------------------------------------
@click.group("orderbook")
def orderbook() -> None:
    """Read an orderbook (the pool's own API by default)."""


@orderbook.command("workerpool")
@click.argument("address", required=False)
@click.option("--orderbook", "url", help="Orderbook URL (default: the pool's own API).")
@click.option("--category", type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True, help="Print the orders as JSON.")
def orderbook_workerpool(
    address: str | None, url: str | None, category: int | None, as_json: bool
) -> None:
    """List the published orders of a workerpool (default: this pool) with remaining volume."""
    settings = _settings()
    pool = address or settings.pool_address
    if not pool:
        raise CommandError("give a workerpool ADDRESS or set POOL_ADDRESS")
    client = _client(settings)
    book = _orderbook(settings, url, client)
    entries = _run(
        lambda: list(
            book.orders(
                workerpool=to_checksum_address(str(pool)),
                category=category,
                app="any",
                dataset="any",
                requester="any",
            )
        )
    )
    for e in entries:
        e["remaining"] = _chain_remaining(
            client, e["orderHash"], int(e["order"]["volume"]), int(e["remaining"])
        )
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo(f"no published order for workerpool {pool}")
        return
    click.echo(
        f"{'orderHash':<66}  {'price':>12}  {'remaining':>11}  {'cat':>3}  {'trust':>5}  "
        f"{'tag':<11}  status"
    )
    for e in entries:
        o = e["order"]
        left = f"{e['remaining']}/{o['volume']}"
        click.echo(
            f"{e['orderHash']:<66}  {o['workerpoolprice']:>12}  {left:>11}  {o['category']:>3}  "
            f"{o['trust']:>5}  {tag_label(o['tag']):<11}  {e['status']}"
        )
    click.echo(f"{len(entries)} order(s), prices in nRLC per task")
