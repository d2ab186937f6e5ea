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


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("node https://mainnet.example/v3/KEY123 unreachable", "node https://mainnet.example/***"),
        ("http://user:pw@host:8545", "http://***@host:8545"),
        ("rediss://:p%40ss@redis:6379/0?ssl_cert_reqs=required", "rediss://***@redis:6379/***"),
        ("Max retries exceeded with url: /v3/KEY123 (Caused by X)", "with url: /*** (Caused"),
        ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
        ('{ "storage": "ipfs", "location": "/ipfs/Qm1" }', '"location": "/ipfs/Qm1"'),
    ],
)
def test_urls_keep_their_scheme_host_and_port_only(text: str, shown: str) -> None:
    from pool.redact import redact_urls

    clean = redact_urls(text)
    assert shown in clean
    for secret in ("KEY123", "pw@", "p%40ss", "ssl_cert_reqs"):
        assert secret not in clean


def test_the_settings_dump_masks_urls_and_the_logs_do_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from pool.redact import RedactFilter

    settings = Settings(
        chain_rpc_url="https://rpc.example/v3/KEY123", redis_url="redis://:pw1234@redis:6379/0"
    )
    public = settings.public()
    assert public["chain_rpc_url"] == "https://rpc.example/***"
    assert public["redis_url"] == "redis://***@redis:6379/***"
    log = logging.getLogger("test-redact")
    log.addFilter(RedactFilter())
    with caplog.at_level(logging.INFO, logger="test-redact"):
        log.info("chain node %s down", settings.chain_rpc_url)
    assert "KEY123" not in caplog.text and "https://rpc.example/***" in caplog.text


def test_the_redis_password_comes_from_its_file_and_tls_verifies_the_server(
    tmp_path: Path,
) -> None:
    import ssl

    from pool.broker import celery_options, redis_url, tls_options

    (tmp_path / "pw").write_text("two words/@:\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    settings = Settings(
        redis_url="rediss://redis:6379/2",
        redis_password_file=str(tmp_path / "pw"),
        redis_ca_file=str(tmp_path / "ca.pem"),
    )
    assert redis_url(settings) == "rediss://:two%20words%2F%40%3A@redis:6379/2"
    tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tmp_path / "ca.pem")}
    assert tls_options(settings) == tls
    options = celery_options(settings)
    assert options["broker_use_ssl"] == options["redis_backend_use_ssl"] == tls
    assert options["broker_url"] == options["result_backend"] == redis_url(settings)
    # plain redis://: no TLS options; a missing password file or CA file names its setting
    assert tls_options(Settings(redis_url="redis://redis:6379/0")) is None
    with pytest.raises(SettingsError, match="WORKERPOOL_REDIS_PASSWORD_FILE"):
        redis_url(Settings(redis_password_file=str(tmp_path / "none")))
    with pytest.raises(SettingsError, match="WORKERPOOL_REDIS_CA_FILE"):
        tls_options(Settings(redis_url="rediss://r:1/0", redis_ca_file=str(tmp_path / "none")))
