"""Deploy the real PoCo v6.1.0 on a fresh chain, from the npm package's files, in token mode
as on Arbitrum (the default) or in native mode.

This follows ``deploy/0_deploy.ts`` of PoCo v6.1.0 with plain CREATE instead of the CreateX
factory (facts and gotchas: docs/protocol.md): in token mode the RLC token comes first (the
faucet RLC whose creation code the package keeps in ``deployments/arbitrum/RLC.json``), the
EIP-2535 base facets come from the package's ``deployments/arbitrumSepolia/*.json`` (not in
``artifacts/``), the PoCo facets from ``artifacts/`` (Arbitrum's list in token mode: the token
escrow and no Boost facets), ``IexecLibOrders_v5`` is linked into the facets that need it, the
registries are initialized, ``configure`` sets the token (the zero address in native mode) and
the EIP-712 domain, and the XS..XL categories are created.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from eth_utils import function_abi_to_4byte_selector

from poco.abi import load_abi
from poco.chain import Receipt, Wallet

log = logging.getLogger(__name__)

BASE_FACETS = ("DiamondCutFacet", "DiamondLoupeFacet", "OwnershipFacet")
MODES = ("token", "native")
# deploy/0_deploy.ts, in its order. Token mode: the facets routed by the Arbitrum hubs (chains
# 42161 and 421614 get no Boost facets): 3 base + 11 PoCo facets, 98 selectors.
TOKEN_FACETS = (
    "IexecAccessorsABILegacyFacet",
    "IexecCategoryManagerFacet",
    "IexecConfigurationExtraFacet",
    "IexecConfigurationFacet",
    "IexecERC20Facet",
    "IexecEscrowTokenFacet",
    "IexecOrderManagementFacet",
    "IexecPoco1Facet",
    "IexecPoco2Facet",
    "IexecPocoAccessorsFacet",
    "IexecRelayFacet",
)
# Native mode (Bellecour-like): the native escrow, and the Boost facets.
NATIVE_FACETS = (
    "IexecAccessorsABILegacyFacet",
    "IexecCategoryManagerFacet",
    "IexecConfigurationExtraFacet",
    "IexecConfigurationFacet",
    "IexecERC20Facet",
    "IexecEscrowNativeFacet",
    "IexecOrderManagementFacet",
    "IexecPoco1Facet",
    "IexecPoco2Facet",
    "IexecPocoAccessorsFacet",
    "IexecPocoBoostFacet",
    "IexecPocoBoostAccessorsFacet",
    "IexecRelayFacet",
)
POCO_FACETS = {"token": TOKEN_FACETS, "native": NATIVE_FACETS}
ZERO = "0x" + "00" * 20
# PoCo's config/config.json: (name, workClockTimeRef in seconds); description is JSON "" .
CATEGORIES = (("XS", 300), ("S", 1200), ("M", 3600), ("L", 10800), ("XL", 36000))
NFT_BASE_URI = "https://nfts-metadata.iex.ec/{kind}/{chain_id}/"
INIT_SELECTOR = bytes.fromhex("e1c7392a")  # DiamondInit.init()


@dataclass(frozen=True)
class Deployment:
    mode: str
    hub: str
    rlc: str  # the token the hub escrows; the zero address in native mode
    app_registry: str
    dataset_registry: str
    workerpool_registry: str
    facets: int
    selectors: int
    transactions: int
    gas_used: int


class Artifacts:
    """Reads contract JSON from an unpacked ``@iexec/poco`` package directory."""

    def __init__(self, package_dir: Path) -> None:
        self.root = Path(package_dir)
        if not (self.root / "artifacts").is_dir():
            raise FileNotFoundError(f"{self.root} is not an unpacked @iexec/poco package")

    def _find(self, name: str) -> dict[str, Any]:
        matches = list((self.root / "artifacts" / "contracts").rglob(f"{name}.sol/{name}.json"))
        if not matches:
            raise FileNotFoundError(f"artifact {name} not found under {self.root}/artifacts")
        return cast(dict[str, Any], json.loads(matches[0].read_text()))

    def artifact(self, name: str) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
        """(abi, bytecode, linkReferences) of a PoCo contract."""
        data = self._find(name)
        return data["abi"], data["bytecode"], data.get("linkReferences", {})

    def base(self, name: str) -> tuple[list[dict[str, Any]], str]:
        """(abi, bytecode) of a contract only present in hardhat-deploy files."""
        data = json.loads(
            (self.root / "deployments" / "arbitrumSepolia" / f"{name}.json").read_text()
        )
        return data["abi"], data["bytecode"]

    def rlc_bytecode(self) -> str:
        """Creation code of the faucet RLC (``deployments/arbitrum/RLC.json``: no ABI there,
        and its ``deployedBytecode`` is the proxy of Arbitrum's real RLC, not this contract)."""
        data = json.loads((self.root / "deployments" / "arbitrum" / "RLC.json").read_text())
        return str(data["bytecode"])


def link(bytecode: str, references: dict[str, Any], libraries: dict[str, str]) -> str:
    """Replace each ``__$…$__`` placeholder (20 bytes at ``start``) with the library address."""
    code = bytecode.removeprefix("0x")
    for libs in references.values():
        for lib_name, places in libs.items():
            address = libraries[lib_name].removeprefix("0x").lower()
            for place in places:
                start, length = place["start"] * 2, place["length"] * 2
                code = code[:start] + address + code[start + length :]
    return "0x" + code


def selectors(abi: list[dict[str, Any]]) -> list[bytes]:
    out: list[bytes] = []
    for entry in abi:
        if entry["type"] == "function":
            out.append(bytes(function_abi_to_4byte_selector(cast(Any, entry))))
        elif entry["type"] == "receive":
            out.append(b"\x00\x00\x00\x00")
        elif entry["type"] == "fallback":
            out.append(b"\xff\xff\xff\xff")
    return out


class Deployer:
    def __init__(self, wallet: Wallet, artifacts: Artifacts, mode: str = "token") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        self.wallet = wallet
        self.eth: Any = wallet.client.eth
        self.artifacts = artifacts
        self.mode = mode
        self.transactions = 0
        self.gas_used = 0

    def _track(self, receipt: Receipt) -> Receipt:
        self.transactions += 1
        self.gas_used += receipt.gas_used
        return receipt

    def create(self, abi: list[dict[str, Any]], bytecode: str, *args: Any) -> str:
        factory = self.eth.contract(abi=abi, bytecode=bytecode)
        receipt = self._track(cast(Receipt, self.wallet.transact(factory.constructor(*args))))
        assert receipt.contract_address, "contract creation returned no address"
        return str(receipt.contract_address)

    def call(self, fn: Any) -> Receipt:
        return self._track(cast(Receipt, self.wallet.transact(fn)))

    def deploy(self) -> Deployment:
        owner = self.wallet.address
        # token mode: the deployer keeps the 87M RLC the constructor mints, and stays the
        # token's owner (the faucet's refill then works on the devnet)
        rlc = (
            self.create(load_abi("RLC"), self.artifacts.rlc_bytecode())
            if self.mode == "token"
            else ZERO
        )
        base: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        init_abi, init_code = self.artifacts.base("DiamondInit")
        diamond_init = self.create(init_abi, init_code)
        for name in BASE_FACETS:
            abi, code = self.artifacts.base(name)
            base[name] = (self.create(abi, code), abi)
        cuts = [(addr, 0, selectors(abi)) for addr, abi in base.values()]
        diamond_abi, diamond_code, _ = self.artifacts.artifact("Diamond")
        proxy = self.create(diamond_abi, diamond_code, cuts, (owner, diamond_init, INIT_SELECTOR))

        lib_abi, lib_code, _ = self.artifacts.artifact("IexecLibOrders_v5")
        del lib_abi  # its ABI breaks web3 (colliding selectors): deploy with an empty one
        libraries = {"IexecLibOrders_v5": self.create([], lib_code)}

        cut_abi = [e for e in base["DiamondCutFacet"][1] if e["type"] != "event"]
        diamond = self.eth.contract(address=proxy, abi=cut_abi)
        routed: set[bytes] = {s for _, _, sels in cuts for s in sels}
        for name in POCO_FACETS[self.mode]:
            abi, code, refs = self.artifacts.artifact(name)
            facet = self.create(abi, link(code, refs, libraries))
            new = [s for s in selectors(abi) if s not in routed]
            routed.update(new)
            if new:
                self.call(diamond.functions.diamondCut([(facet, 0, new)], ZERO, b""))

        registries: dict[str, str] = {}
        for name, kind in (
            ("AppRegistry", "apps"),
            ("DatasetRegistry", "datasets"),
            ("WorkerpoolRegistry", "workerpools"),
        ):
            abi, code, _ = self.artifacts.artifact(name)
            address = self.create(abi, code)
            registry = self.eth.contract(address=address, abi=abi)
            self.call(registry.functions.initialize(ZERO))
            uri = NFT_BASE_URI.format(kind=kind, chain_id=self.wallet.client.chain_id)
            self.call(registry.functions.setBaseURI(uri))
            registries[name] = address

        hub = self.eth.contract(address=proxy, abi=self.wallet.client.hub.abi)
        self.call(
            hub.functions.configure(
                rlc,
                "Staked RLC",
                "SRLC",
                9,
                registries["AppRegistry"],
                registries["DatasetRegistry"],
                registries["WorkerpoolRegistry"],
                ZERO,
            )
        )
        for name, timeref in CATEGORIES:
            self.call(hub.functions.createCategory(name, '""', timeref))
        loupe_abi = [e for e in base["DiamondLoupeFacet"][1] if e["type"] == "function"]
        routed_facets = self.eth.contract(address=proxy, abi=loupe_abi).functions.facets().call()
        return Deployment(
            mode=self.mode,
            hub=proxy,
            rlc=rlc,
            app_registry=registries["AppRegistry"],
            dataset_registry=registries["DatasetRegistry"],
            workerpool_registry=registries["WorkerpoolRegistry"],
            facets=len(routed_facets),
            selectors=sum(len(f[1]) for f in routed_facets),
            transactions=self.transactions,
            gas_used=self.gas_used,
        )
