"""Settings: typed, read from the environment, errors name the variable, docs in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pool.settings import SETTINGS, Settings, SettingsError
from pool.wallets import scheduler_key

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_parsing() -> None:
    s = Settings.from_env(
        {
            "IEXEC_PRIVATE_CHAIN_ADDRESS": "http://127.0.0.1:8545/",
            "WORKERPOOL_CATEGORIES": "0,2",
            "POOL_ADDRESS": "0x" + "ab" * 20,
        }
    )
    assert s.chain_rpc_url == "http://127.0.0.1:8545"
    assert s.categories == (0, 2)
    assert s.pool_address is not None and s.pool_address.lower() == "0x" + "ab" * 20
    assert s.core_port == 18090 and s.reveal_timeout_period == 120000
    # the dataclass defaults and the table defaults agree
    assert Settings() == Settings.from_env({})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"POOL_ADDRESS": "0x123"}, "POOL_ADDRESS='0x123': is not an Ethereum address"),
        ({"WORKERPOOL_POLL_PERIOD": "-1"}, "WORKERPOOL_POLL_PERIOD='-1': must be > 0"),
        ({"IEXEC_PRIVATE_CHAIN_ADDRESS": "localhost"}, "IEXEC_PRIVATE_CHAIN_ADDRESS='localhost'"),
        ({"IEXEC_CORE_WALLET_PRIVATE_KEY": "x", "WORKERPOOL_DEVNET": "maybe"}, "WORKERPOOL_DEVNET"),
    ],
)
def test_malformed_setting_names_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


def test_missing_required_settings_are_named() -> None:
    with pytest.raises(SettingsError, match="IEXEC_PRIVATE_CHAIN_ADDRESS, POOL_ADDRESS"):
        Settings.from_env({}).require("chain_rpc_url", "pool_address")


def test_raw_key_needs_devnet_flag_and_secrets_are_masked(tmp_path: Path) -> None:
    key = "0x" + "11" * 32
    with pytest.raises(SettingsError, match="devnet only"):
        scheduler_key(Settings(core_wallet_private_key=key))
    assert scheduler_key(Settings(core_wallet_private_key=key, devnet=True)) == key
    assert key not in repr(Settings(core_wallet_private_key=key))
    assert Settings(core_wallet_private_key=key).public()["core_wallet_private_key"] == "***"


def test_encrypted_keystore_is_the_production_path(tmp_path: Path) -> None:
    import json

    from eth_account import Account
    from eth_typing import HexStr

    key = "0x" + "22" * 32
    path = tmp_path / "wallet.json"
    path.write_text(json.dumps(Account.encrypt(HexStr(key), "s3cret", iterations=2)))
    (tmp_path / "pw").write_text("s3cret\n")
    assert scheduler_key(Settings(core_wallet_path=str(path), core_wallet_password="s3cret")) == key
    assert (
        scheduler_key(
            Settings(core_wallet_path=str(path), core_wallet_password_file=str(tmp_path / "pw"))
        )
        == key
    )
    with pytest.raises(SettingsError, match="wrong password"):
        scheduler_key(Settings(core_wallet_path=str(path), core_wallet_password="nope"))


def test_docs_settings_is_generated_from_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cli", "settings", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert (ROOT / "docs" / "settings.md").read_text() == out
    for spec in SETTINGS.values():
        assert f"`{spec.env}`" in out


def test_a_chain_preset_fills_chain_id_and_hub_and_explicit_values_win() -> None:
    from pool.settings import CHAINS

    # Given IEXEC_CHAIN alone, Then the SDK 9 values of that network are filled in
    for name, chain_id, hub in (
        ("arbitrum-mainnet", 42161, "0x098bFCb1E50ebcA0BaA92C12eA0c3F045A1aD9f0"),
        ("arbitrum-sepolia-testnet", 421614, "0xB2157BF2fAb286b2A4170E3491Ac39770111Da3E"),
    ):
        s = Settings.from_env({"IEXEC_CHAIN": name})
        assert (s.chain, s.chain_id, s.hub_address) == (name, chain_id, hub)
        assert s.preset is CHAINS[name]
    assert CHAINS["arbitrum-mainnet"].rlc == "0xe649e6a1F2afc63ca268C2363691ceCAF75CF47C"
    assert CHAINS["arbitrum-sepolia-testnet"].rlc == "0x9923eD3cbd90CD78b910c475f9A731A6e0b8C963"
    # names are read case-insensitively, as operators type them
    assert Settings.from_env({"IEXEC_CHAIN": " Arbitrum-Mainnet "}).chain_id == 42161
    # explicit IEXEC_CHAIN_ID / IEXEC_HUB_ADDRESS win over the preset
    hub = "0x" + "ab" * 20
    s = Settings.from_env(
        {"IEXEC_CHAIN": "arbitrum-mainnet", "IEXEC_CHAIN_ID": "7", "IEXEC_HUB_ADDRESS": hub}
    )
    assert (s.chain_id, s.hub_address.lower()) == (7, hub)  # type: ignore[union-attr]
    # keyword construction (tests, tools) fills the same way
    assert Settings(chain="devnet").hub_address == CHAINS["devnet"].hub
    # without a preset nothing is filled: the hub stays required
    assert Settings.from_env({}).hub_address is None and Settings.from_env({}).chain_id == 0


def test_an_unknown_chain_is_refused_with_the_known_ones() -> None:
    with pytest.raises(SettingsError, match="IEXEC_CHAIN='bellecour': unknown chain; known: "):
        Settings.from_env({"IEXEC_CHAIN": "bellecour"})
    with pytest.raises(SettingsError, match="arbitrum-mainnet, arbitrum-sepolia-testnet, devnet"):
        Settings(chain="mainnet")


def test_node_names_in_messages_hide_what_may_be_a_secret() -> None:
    from pool.wallets import node_name

    assert node_name("https://user:pw@arb-mainnet.example.com/v2/KEY123?x=1") == (
        "https://arb-mainnet.example.com"
    )
    assert node_name("http://127.0.0.1:8545") == "http://127.0.0.1:8545"
