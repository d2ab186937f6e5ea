"""ABIs of the PoCo proxy, its registries and the RLC token, from npm ``@iexec/poco@6.1.0``.

The ABI JSON kept in the repository (``poco/abi/*.json``) is copied verbatim from the
package's ``abis/contracts`` folder, except ``RLC.json``: the package has the RLC's ABI only
in human-readable form, so it is written out here, limited to the ERC-20 functions the faucet
RLC deployed on the devnet and the RLC of Arbitrum both have (docs/protocol.md, "Token mode").
Bytecode for the devnet deployer is read from a cached ``npm pack`` of the same version at
deploy time (see :mod:`devnet.deploy`).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

ABI_NAMES = (
    "IexecInterfaceToken",
    "IexecInterfaceNative",
    "AppRegistry",
    "App",
    "DatasetRegistry",
    "Dataset",
    "WorkerpoolRegistry",
    "Workerpool",
    "RLC",
)


@cache
def load_abi(name: str) -> list[dict[str, Any]]:
    """Return the ABI list of one contract (cached; callers must not mutate it)."""
    if name not in ABI_NAMES:
        raise KeyError(f"unknown ABI {name!r}; known: {', '.join(ABI_NAMES)}")
    text = resources.files("poco").joinpath("abi", f"{name}.json").read_text()
    abi: list[dict[str, Any]] = json.loads(text)
    return abi


def proxy_abi() -> list[dict[str, Any]]:
    """ABI of the PoCo Diamond proxy as deployed on Arbitrum (``IexecInterfaceToken``: all
    facets, events included). It differs from the native-mode interface only in the three
    deposit functions (:func:`native_proxy_abi`)."""
    return load_abi("IexecInterfaceToken")


def native_proxy_abi() -> list[dict[str, Any]]:
    """ABI of a native-mode proxy (``IexecInterfaceNative``): payable ``deposit()``,
    ``depositFor(address)`` and ``depositForArray``; everything else as :func:`proxy_abi`."""
    return load_abi("IexecInterfaceNative")
