"""Chain access from settings: the chain client, and wallets from an encrypted keystore
(production) or a raw key (devnet only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eth_account import Account

from poco.chain import ChainClient
from pool.nonces import redis_nonces
from pool.settings import Settings, SettingsError

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
