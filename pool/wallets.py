"""Load wallets from settings: an encrypted keystore (production) or a raw key (devnet only)."""

from __future__ import annotations

import json
from pathlib import Path

from eth_account import Account

from pool.settings import Settings, SettingsError


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


def scheduler_key(settings: Settings) -> str:
    """The scheduler (workerpool owner) private key, from IEXEC_CORE_WALLET_* settings."""
    if settings.core_wallet_path:
        password = _password(settings.core_wallet_password, settings.core_wallet_password_file)
        return decrypt_keystore(settings.core_wallet_path, password, "IEXEC_CORE_WALLET_PATH")
    if settings.core_wallet_private_key:
        if not settings.devnet:
            raise SettingsError(
                "IEXEC_CORE_WALLET_PRIVATE_KEY is for the devnet only (set WORKERPOOL_DEVNET=1); "
                "use IEXEC_CORE_WALLET_PATH and IEXEC_CORE_WALLET_PASSWORD on a real chain"
            )
        return settings.core_wallet_private_key
    raise SettingsError(
        "missing required setting(s): IEXEC_CORE_WALLET_PATH (+ IEXEC_CORE_WALLET_PASSWORD)"
    )


def worker_key(settings: Settings) -> str:
    """This worker node's private key, from IEXEC_WORKER_WALLET_* settings."""
    if settings.worker_wallet_path:
        password = _password(settings.worker_wallet_password, settings.worker_wallet_password_file)
        return decrypt_keystore(settings.worker_wallet_path, password, "IEXEC_WORKER_WALLET_PATH")
    if settings.worker_wallet_private_key:
        if not settings.devnet:
            raise SettingsError(
                "IEXEC_WORKER_WALLET_PRIVATE_KEY is for the devnet only (set WORKERPOOL_DEVNET=1); "
                "use IEXEC_WORKER_WALLET_PATH and IEXEC_WORKER_WALLET_PASSWORD on a real chain"
            )
        return settings.worker_wallet_private_key
    raise SettingsError(
        "missing required setting(s): IEXEC_WORKER_WALLET_PATH (+ IEXEC_WORKER_WALLET_PASSWORD)"
    )
