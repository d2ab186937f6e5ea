"""Chain access from settings: the chain client, the check that it is the chain the settings
name, and wallets from an encrypted keystore (production) or a raw key (devnet only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from eth_account import Account

from poco.chain import ChainClient
from poco.errors import NetworkMismatch
from pool.nonces import redis_nonces
from pool.settings import CHAINS, Settings, SettingsError

GWEI = 10**9


def chain_client(settings: Settings, redis: Any = None) -> ChainClient:
    """The chain client every service builds from the chain settings. With ``redis``, the
    nonces of its wallets are shared in Redis with every other process sending with them
    (the scheduler's processes: :mod:`pool.nonces`)."""
    settings.require("chain_rpc_url", "hub_address")
    return ChainClient(
        str(settings.chain_rpc_url),
        str(settings.hub_address),
        request_timeout=settings.rpc_timeout,
        retries=settings.rpc_retries,
        log_chunk=settings.log_range,
        receipt_timeout=settings.tx_timeout,
        replace_after=settings.tx_replace_after,
        fee_bump=settings.tx_fee_bump,
        max_fee=int(settings.max_fee_gwei * GWEI),
        shared_nonces=redis_nonces(redis) if redis is not None else None,
    )


def node_name(url: str) -> str:
    """A node's URL without what may be a secret (user, password, path, query: RPC providers
    put API keys there): fit for logs and messages."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def check_chain(settings: Settings, client: ChainClient) -> None:
    """Stop start-up when the node is not the chain the settings name: its chain id differs
    from IEXEC_CHAIN_ID (or IEXEC_CHAIN's), or there is no contract at IEXEC_HUB_ADDRESS."""
    actual = client.chain_id
    node = node_name(str(settings.chain_rpc_url))
    known = {p.chain_id: name for name, p in CHAINS.items()}
    if settings.chain_id and actual != settings.chain_id:
        named = (
            f"IEXEC_CHAIN={settings.chain} (chain {settings.chain_id})"
            if settings.chain
            else (f"IEXEC_CHAIN_ID={settings.chain_id}")
        )
        is_known = f" ({known[actual]})" if actual in known else ""
        raise NetworkMismatch(
            f"{named} but the node at {node} (IEXEC_PRIVATE_CHAIN_ADDRESS) reports chain "
            f"{actual}{is_known}: point IEXEC_PRIVATE_CHAIN_ADDRESS at a node of chain "
            f"{settings.chain_id}, or fix the chain setting"
        )
    code = client.rpc("get_code", lambda: bytes(client.eth.get_code(client.hub_address)))
    if not code:
        raise NetworkMismatch(
            f"no contract at IEXEC_HUB_ADDRESS {client.hub_address} on chain {actual} "
            f"(node {node}): the hub is of another chain, or PoCo is not deployed there"
        )


def checked_chain_client(settings: Settings, redis: Any = None) -> ChainClient:
    """:func:`chain_client` (nonces shared in ``redis`` when given), checked against the node
    (:func:`check_chain`): what every service builds at start-up."""
    client = chain_client(settings, redis)
    check_chain(settings, client)
    return client


def decrypt_keystore(path: str, password: str, what: str) -> str:
    try:
        keystore = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{what}: cannot read keystore {path}: {exc}") from exc
    try:
        return "0x" + bytes(Account.decrypt(keystore, password)).hex()
    except ValueError as exc:
        raise SettingsError(f"{what}: cannot decrypt keystore {path} (wrong password?)") from exc


def _password(direct: str, file: str) -> str:
    if file:
        try:
            return Path(file).read_text().rstrip("\n")
        except OSError as exc:
            raise SettingsError(f"cannot read password file {file}: {exc}") from exc
    return direct


def _key(path: str, password: str, password_file: str, raw: str, devnet: bool, prefix: str) -> str:
    """A keystore (the production path) or, on a devnet only, a raw key."""
    if path:
        return decrypt_keystore(path, _password(password, password_file), f"{prefix}_PATH")
    if raw:
        if not devnet:
            raise SettingsError(
                f"{prefix}_PRIVATE_KEY is for the devnet only (set WORKERPOOL_DEVNET=1); "
                f"use {prefix}_PATH and {prefix}_PASSWORD on a real chain"
            )
        return raw
    raise SettingsError(f"missing required setting(s): {prefix}_PATH (+ {prefix}_PASSWORD)")


def scheduler_key(settings: Settings) -> str:
    """The scheduler (workerpool owner) private key, from IEXEC_CORE_WALLET_* settings."""
    return _key(
        settings.core_wallet_path,
        settings.core_wallet_password,
        settings.core_wallet_password_file,
        settings.core_wallet_private_key,
        settings.devnet,
        "IEXEC_CORE_WALLET",
    )


def worker_key(settings: Settings) -> str:
    """This worker node's private key, from IEXEC_WORKER_WALLET_* settings."""
    return _key(
        settings.worker_wallet_path,
        settings.worker_wallet_password,
        settings.worker_wallet_password_file,
        settings.worker_wallet_private_key,
        settings.devnet,
        "IEXEC_WORKER_WALLET",
    )
