"""ABIs of the PoCo proxy and its registries, taken from npm ``@iexec/poco@6.1.0``.

Only the ABI JSON is kept in the repository (``poco/abi/*.json``, copied verbatim from the
package's ``abis/contracts`` folder). Bytecode for the devnet deployer is read from a cached
``npm pack`` of the same version at deploy time (see :mod:`devnet.deploy`).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

ABI_NAMES = (
    "IexecInterfaceNative",
    "AppRegistry",
    "App",
    "DatasetRegistry",
    "Dataset",
    "WorkerpoolRegistry",
    "Workerpool",
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
    """ABI of the PoCo Diamond proxy (``IexecInterfaceNative``: all facets, events included)."""
    return load_abi("IexecInterfaceNative")
