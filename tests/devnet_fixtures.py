"""Devnet fixtures: one anvil with the real PoCo per test session, started by the tests (token
mode, as on Arbitrum; ``native_devnet`` is another anvil with the native-mode PoCo).

Tests that move anvil's clock take ``chain_snapshot`` so the chain (and nonces) are rolled
back afterwards and the other tests' deadlines are untouched.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devnet import network as devnet_mod
from poco import chain as chain_mod
from poco.chain import ChainClient, Wallet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DevnetHandle:
    directory: Path
    info: dict[str, Any]
    client: ChainClient

    @property
    def accounts(self) -> dict[str, Any]:
        return self.info["accounts"]

    def key(self, role: str) -> str:
        return str(self.accounts[role]["private_key"])

    def address(self, role: str) -> str:
        return str(self.accounts[role]["address"])

    def worker_key(self, n: int) -> str:
        return str(self.accounts["workers"][n]["private_key"])

    def wallet(self, role: str) -> Wallet:
        return self.client.wallet(self.key(role))

    def worker_wallet(self, n: int) -> Wallet:
        return self.client.wallet(self.worker_key(n))

    def app(self, name: str = "echo") -> str:
        return str(self.info["apps"][name]["address"])

    def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        return self.client.w3.provider.make_request(method, params or [])  # type: ignore[arg-type]

    def increase_time(self, seconds: int) -> None:
        self.rpc("evm_increaseTime", [seconds])
        self.rpc("evm_mine", [])


def _start(tmp_path_factory: pytest.TempPathFactory, mode: str) -> DevnetHandle:
    directory = tmp_path_factory.mktemp(f"devnet-{mode}")
    try:
        info, _, _ = devnet_mod.up(directory, port=free_port(), mode=mode)
    except (devnet_mod.DevnetError, OSError) as exc:
        from conftest import require_service

        require_service("devnet", f"could not start anvil with PoCo: {exc}")
        raise
    return DevnetHandle(directory, info, ChainClient(info["rpc_url"], info["hub"]))


@pytest.fixture(scope="session")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevnetHandle]:
    """The devnet as iExec runs today: PoCo in token mode (Arbitrum's facets, an RLC)."""
    handle = _start(tmp_path_factory, "token")
    yield handle
    devnet_mod.Devnet(handle.directory).stop()


@pytest.fixture(scope="session")
def native_devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevnetHandle]:
    """A second chain, with PoCo in native mode (stakes in the coin, Bellecour-like)."""
    handle = _start(tmp_path_factory, "native")
    yield handle
    devnet_mod.Devnet(handle.directory).stop()


@pytest.fixture
def chain_snapshot(devnet: DevnetHandle) -> Iterator[DevnetHandle]:
    """Roll the chain back after the test (for tests that move time or change balances)."""
    snap = devnet.rpc("evm_snapshot")["result"]
    yield devnet
    devnet.rpc("evm_revert", [snap])
    chain_mod.reset_nonces()
