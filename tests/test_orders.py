"""Workerpool orders on the devnet: the CLI flow, the market-shaped orderbook API, its
preflight checks, challenge authorization, publication rules, queries and the chain sync.

The orderbook is served over real HTTP (werkzeug, a thread) from a mongomock store; the CLI
runs in-process through click's runner and reaches it like any client would.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result
from devnet_fixtures import DevnetHandle
from flask import Flask
from werkzeug.serving import make_server

from api.orderbook import orderbook_blueprint
from cli.main import main
from devnet.requester import match_deal
from orders.challenge import (
    CHALLENGE_TEXT,
    authorization_header,
    challenge_typed_data,
    typed_data_hash,
)
from orders.client import OrderbookClient
from orders.rules import OrderbookError
from orders.store import OrderStore
from orders.sync import sync_orders
from poco import actions
from poco.errors import TransactionReverted
from poco.orders import WorkerpoolOrder, random_salt
from pool.settings import Settings
from pool.store import Store, connect

pytestmark = pytest.mark.devnet

ZERO = "0x" + "00" * 20
TEE_SCONE = "0x" + "00" * 31 + "03"
TEE_GRAMINE = "0x" + "00" * 31 + "05"
TEE_TDX = "0x" + "00" * 31 + "09"
GPU = "0x" + "00" * 30 + "0100"


@dataclass
class Book:
    """A running orderbook on the devnet and the ways to talk to it."""

    devnet: DevnetHandle
    settings: Settings
    store: Store
    url: str
    tmp: Path

    @property
    def client(self) -> Any:
        return self.devnet.client

    @property
    def chain_id(self) -> int:
        return int(self.client.chain_id)

    @property
    def pool(self) -> str:
        return str(self.devnet.info["workerpool"])

    @property
    def orders(self) -> OrderStore:
        return OrderStore(self.store.db)

    # ---- the API ----------------------------------------------------------------------------
    def call(
        self, method: str, path: str, *, role: str | None = None, **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        params = {"chainId": self.chain_id, **kw.pop("params", {})}
        headers = kw.pop("headers", {})
        if role is not None:
            headers["Authorization"] = self.auth(role)
        r = requests.request(
            method, f"{self.url}{path}", params=params, headers=headers, timeout=30, **kw
        )
        return r.status_code, r.json()

    def auth(self, role: str = "scheduler") -> str:
        status, body = self.call("GET", "/challenge", params={"address": self.devnet.address(role)})
        assert status == 200, body
        return authorization_header(body["data"], self.devnet.key(role))

    def publish(self, order: dict[str, Any], role: str = "scheduler") -> tuple[int, dict[str, Any]]:
        return self.call("POST", "/workerpoolorders", role=role, json={"order": order})

    def listing(self, **params: Any) -> dict[str, Any]:
        status, body = self.call("GET", "/workerpoolorders", params=params)
        assert status == 200, body
        return body

    def one(self, order_hash: str) -> dict[str, Any]:
        status, body = self.call("GET", f"/workerpoolorders/{order_hash}")
        assert status == 200, body
        return body

    # ---- orders -----------------------------------------------------------------------------
    def order(self, signer: str = "scheduler", **fields: Any) -> WorkerpoolOrder:
        values: dict[str, Any] = {"workerpool": self.pool, "volume": 1, "salt": random_salt()}
        values.update(fields)
        return WorkerpoolOrder(**values).signed(self.devnet.key(signer), self.client.domain())

    def buy(self, order: WorkerpoolOrder, volume: int) -> str:
        deal = match_deal(
            self.client,
            app=self.devnet.app("echo"),
            app_owner_key=self.devnet.key("app_provider"),
            workerpool=self.pool,
            scheduler_key=self.devnet.key("scheduler"),
            requester_key=self.devnet.key("requester"),
            volume=volume,
            trust=int(order.trust),
            category=int(order.category),
            tag=order.tag,
            workerpoolorder=order,
        )
        return deal.dealid

    # ---- the CLI ----------------------------------------------------------------------------
    def env(self, role: str = "scheduler") -> dict[str, str]:
        return {
            "IEXEC_PRIVATE_CHAIN_ADDRESS": self.devnet.info["rpc_url"],
            "IEXEC_HUB_ADDRESS": self.devnet.info["hub"],
            "POOL_ADDRESS": self.pool,
            "WORKERPOOL_DEVNET": "1",
            "IEXEC_CORE_WALLET_PRIVATE_KEY": self.devnet.key(role),
            "WORKERPOOL_ORDERBOOK_URL": self.url,
            "WORKERPOOL_ORDER_PRICE": "1000",
            "WORKERPOOL_ORDER_VOLUME": "5",
            "WORKERPOOL_ORDER_TRUST": "1",
            "WORKERPOOL_TEE_STACK": ",".join(self.settings.tee_stack),
            "WORKERPOOL_SMS_TDX_URL": self.settings.sms_tdx_url,
            "WORKERPOOL_RESULT_PROXY_URL": self.settings.result_proxy_url,
            "MONGO_URL": self.settings.mongo_url,
            "MONGO_DB": self.settings.mongo_db,
        }

    def gpu_node(self, address: str = "0x" + "9a" * 20) -> None:
        """A worker node serving GPU tasks, alive (its heartbeat in the pool's store)."""
        self.store.record_heartbeat(
            address, {"name": "gpu-node", "capabilities": ["standard", "gpu"], "slots": 1}
        )

    def cli(self, *args: str, role: str = "scheduler", **env: str) -> Result:
        return CliRunner().invoke(main, list(args), env={**self.env(role), **env})


def serve(app: Flask) -> tuple[str, Any]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return f"http://127.0.0.1:{server.port}", server


@pytest.fixture
def book(devnet: DevnetHandle, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Book]:
    """The orderbook; parametrize it indirectly with a TEE stack to sell TEE tags (with the
    SMS and result proxy a TEE stack needs). Its store is a named in-memory one the CLI (run
    in-process) reaches through MONGO_URL."""
    stack = tuple(getattr(request, "param", ()))
    settings = Settings(
        chain_rpc_url=devnet.info["rpc_url"],
        hub_address=devnet.info["hub"],
        pool_address=devnet.info["workerpool"],
        devnet=True,
        orderbook_sync_interval=1e-6,  # every read syncs: tests see the chain at once
        mongo_url=f"mongomock://orders-{uuid.uuid4().hex}",
        mongo_db="orders",
        tee_stack=stack,
        sms_tdx_url="http://sms.example" if stack else "",
        result_proxy_url="http://result-proxy.example" if stack else "",
    )
    store = connect(settings)
    app = Flask("orderbook-test")
    app.register_blueprint(orderbook_blueprint(settings, store, devnet.client))
    url, server = serve(app)
    yield Book(devnet, settings, store, url, tmp_path)
    server.shutdown()


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def _refused(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result.output


# ---- the whole flow, from the CLI --------------------------------------------------------------
def test_init_sign_publish_match_unpublish_cancel_then_matching_reverts(
    book: Book, chain_snapshot: DevnetHandle, tmp_path: Path
) -> None:
    template, signed = tmp_path / "wp.json", tmp_path / "wp.signed.json"
    # Given a template from the pool's settings
    out = _ok(book.cli("order", "init", "--out", str(template)))
    assert "5 task(s) at 1000 nRLC" in out
    terms = json.loads(template.read_text())
    assert terms == {
        "workerpool": book.pool,
        "workerpoolprice": 1000,
        "volume": 5,
        "tag": "0x" + "00" * 32,
        "category": 0,
        "trust": 1,
        "apprestrict": ZERO,
        "datasetrestrict": ZERO,
        "requesterrestrict": ZERO,
    }
    # When the owner signs it (random salt, EIP-712) and publishes it
    out = _ok(book.cli("order", "sign", str(template), "--out", str(signed)))
    order = WorkerpoolOrder.from_dict(json.loads(signed.read_text()))
    order_hash = order.hash(book.client.domain())
    assert order_hash in out and order.salt != "0x" + "00" * 32
    assert book.client.verify_signature(book.devnet.address("scheduler"), order_hash, order.sign)
    out = _ok(book.cli("order", "publish", str(signed)))
    assert f"published {order_hash}" in out and "remaining 5 of 5" in out
    # Then it is listed with its full remaining volume (CLI and API)
    out = _ok(book.cli("orderbook", "workerpool"))
    assert order_hash in out and "5/5" in out and "open" in out
    listed = book.listing()["orders"]
    assert [(o["orderHash"], o["remaining"], o["status"]) for o in listed] == [
        (order_hash, 5, "open")
    ]
    assert set(listed[0]) == {
        "orderHash",
        "chainId",
        "order",
        "remaining",
        "status",
        "signer",
        "publicationTimestamp",
    }
    # When a requester matches 2 of its 5 tasks on chain
    dealid = book.buy(order, 2)
    # Then the remaining volume drops to 3 and the deal is recorded on the order
    assert "3/5" in _ok(book.cli("orderbook", "workerpool"))
    shown = book.one(order_hash)
    assert shown["remaining"] == 3 and shown["status"] == "open"
    assert [d["dealid"] for d in shown["deals"]] == [dealid]
    assert "remaining    3 of 5" in _ok(book.cli("order", "show", order_hash))
    # When it is unpublished: no longer listed, but the CLI warns it is still valid on chain
    out = _ok(book.cli("order", "unpublish", order_hash))
    assert f"unpublished {order_hash}" in out and "stays valid on chain" in out
    assert "no published order" in _ok(book.cli("orderbook", "workerpool"))
    assert book.listing()["count"] == 0
    assert book.one(order_hash)["status"] == "unpublished"
    assert book.client.view_consumed(order_hash) == 2  # still matchable on chain
    # When it is cancelled on chain
    out = _ok(book.cli("order", "cancel", order_hash))
    assert f"cancelled {order_hash} on chain" in out
    assert book.client.view_consumed(order_hash) == 5
    assert book.one(order_hash)["status"] == "cancelled"
    # Then matchOrders with it reverts
    with pytest.raises(TransactionReverted, match="matchOrders"):
        book.buy(order, 1)
    # And cancelling again is refused before any transaction
    _refused(book.cli("order", "cancel", order_hash), "nothing to cancel")


# ---- preflight checks, through the CLI -----------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tag", "scone"], "tag: 0x" + "00" * 31 + "02 (scone) is not a tag this pool sells"),
        (["--tag", "tee"], "is not a tag this pool sells"),
        (["--tag", "tee,scone,gpu"], "is not a tag this pool sells"),
        (["--tag", "cuda"], "unknown tag name 'cuda'"),
        (["--volume", "0"], "volume: must be at least 1"),
        (["--apprestrict", "0x1234"], "apprestrict: '0x1234' is not an address"),
        (["--requesterrestrict", "bob"], "requesterrestrict: 'bob' is not an address"),
    ],
)
def test_cli_init_refuses_bad_terms(
    book: Book, tmp_path: Path, options: list[str], message: str
) -> None:
    out = tmp_path / "t.json"
    _refused(book.cli("order", "init", "--out", str(out), *options), "preflight", message)
    assert not out.exists()


def test_cli_init_refuses_tee_tags_without_a_tee_stack(book: Book, tmp_path: Path) -> None:
    for tag in ("tee,scone", TEE_GRAMINE, "tee,tdx"):
        out = tmp_path / "t.json"
        _refused(
            book.cli("order", "init", "--out", str(out), "--tag", tag, "--trust", "1"),
            "preflight",
            "is a TEE tag, and this pool runs no",
            "WORKERPOOL_TEE_STACK is empty",
        )
        assert not out.exists()


@pytest.mark.parametrize("book", [("tdx",)], indirect=True)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tag", "tee,tdx", "--trust", "0"], "trust: a TEE order (tee,tdx) needs trust 1"),
        (["--tag", TEE_TDX, "--trust", "3"], "needs trust 1, got 3"),
    ],
)
def test_cli_init_refuses_a_tee_order_of_the_stack_without_trust_1(
    book: Book, tmp_path: Path, options: list[str], message: str
) -> None:
    _refused(book.cli("order", "init", "--out", str(tmp_path / "t.json"), *options), message)


@pytest.mark.parametrize("book", [("tdx",)], indirect=True)
def test_cli_init_accepts_tee_names_and_bytes32_with_a_tee_stack(
    book: Book, tmp_path: Path
) -> None:
    for tag in ("tee,tdx", TEE_TDX):
        out = tmp_path / f"{tag[-2:]}.json"
        _ok(book.cli("order", "init", "--out", str(out), "--tag", tag, "--trust", "1"))
        assert json.loads(out.read_text())["tag"] == TEE_TDX
    # the SGX frameworks stay refused: no node of this pool runs them
    for tag in ("tee,scone", TEE_GRAMINE):
        out = tmp_path / "sgx.json"
        _refused(
            book.cli("order", "init", "--out", str(out), "--tag", tag, "--trust", "1"),
            "(WORKERPOOL_TEE_STACK is tdx)",
        )
        assert not out.exists()
    # a TEE stack without its SMS or result proxy is refused before anything is signed
    _refused(
        book.cli("order", "init", "--out", str(out), WORKERPOOL_RESULT_PROXY_URL=""),
        "WORKERPOOL_TEE_STACK=tdx needs WORKERPOOL_RESULT_PROXY_URL",
    )


@pytest.mark.parametrize(
    ("edit", "role", "message"),
    [
        ({"category": 99}, "scheduler", "category: category 99 does not exist on chain"),
        ({"volume": 0}, "scheduler", "volume: must be at least 1"),
        ({"tag": "tee,scone", "trust": 1}, "scheduler", "this pool runs no scone enclave"),
        ({"tag": "tee,tdx", "trust": 1}, "scheduler", "WORKERPOOL_TEE_STACK is empty"),
        ({"tag": GPU}, "scheduler", "no live worker node serves gpu tasks"),
        ({"tag": "0x" + "00" * 31 + "02"}, "scheduler", "is not a tag this pool sells"),
        ({"datasetrestrict": "0xnope"}, "scheduler", "datasetrestrict: '0xnope' is not an address"),
        ({}, "requester", "does not own workerpool"),
        ({"workerpool": "app"}, "scheduler", "is not a workerpool registered on chain"),
    ],
)
def test_cli_sign_refuses_what_poco_would(
    book: Book, tmp_path: Path, edit: dict[str, Any], role: str, message: str
) -> None:
    template = tmp_path / "t.json"
    _ok(book.cli("order", "init", "--out", str(template)))
    data = json.loads(template.read_text())
    if edit.get("workerpool") == "app":
        edit = {"workerpool": book.devnet.app("echo")}
    template.write_text(json.dumps({**data, **edit}))
    out = tmp_path / "s.json"
    _refused(
        book.cli("order", "sign", str(template), "--out", str(out), role=role), "preflight", message
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tampered", "the signature does not verify for the workerpool owner"),
        ("other_signer", "recovers to"),
        ("garbage", "the signature does not decode"),
        ("unsigned", "the order is not signed"),
        ("tee", "is a TEE tag"),
        ("gpu", "no live worker node serves gpu tasks"),
        ("wrong_wallet", "is not the order's signer"),
    ],
)
def test_cli_publish_refuses_bad_orders_before_contacting_the_orderbook(
    book: Book, tmp_path: Path, case: str, message: str
) -> None:
    order = book.order(volume=2, workerpoolprice=10)
    data = order.to_dict()
    role = "scheduler"
    if case == "tampered":
        data["workerpoolprice"] = 1  # changed after signing
    elif case == "other_signer":
        data = book.order(signer="requester", volume=2).to_dict()
    elif case == "garbage":
        data["sign"] = "0x1234"
    elif case == "unsigned":
        data["sign"] = "0x"
    elif case == "tee":
        data = book.order(tag=TEE_SCONE, trust=1).to_dict()
    elif case == "gpu":
        data = book.order(tag=GPU).to_dict()
    elif case == "wrong_wallet":
        role = "requester"
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    _refused(book.cli("order", "publish", str(path), role=role), message)
    assert book.orders.orders.count_documents({}) == 0


# ---- preflight checks, through the API -----------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("bad_tag", 400, "tag: 0x" + "00" * 30 + "0400 (bit10) is not a tag this pool sells"),
        ("tee", 400, "tag: tee,gramine is a TEE tag, and this pool runs no gramine enclave"),
        ("gpu", 400, "tag: gpu: no live worker node serves gpu tasks"),
        ("category", 400, "category: category 42 does not exist on chain"),
        ("volume", 400, "volume: must be at least 1"),
        ("address", 400, "apprestrict: '0xabc' is not an address"),
        ("missing", 400, "missing field(s) trust"),
        ("other_pool", 400, "this orderbook lists orders of workerpool"),
        ("wrong_signer", 403, "recovers to"),
        ("tampered", 403, "the signature does not verify for the workerpool owner"),
        ("garbage_sign", 400, "the signature does not decode"),
        ("unsigned", 400, "the order is not signed"),
        ("not_the_signer", 403, "only the order signer"),
    ],
)
def test_api_publish_preflight_errors(book: Book, case: str, status: int, message: str) -> None:
    role = "scheduler"
    data = book.order(volume=1).to_dict()
    if case == "bad_tag":
        data = book.order(tag="0x" + "00" * 30 + "0400").to_dict()
    elif case == "tee":
        data = book.order(tag="tee,gramine", trust=1).to_dict()
    elif case == "gpu":
        data = book.order(tag=GPU).to_dict()
    elif case == "category":
        data = book.order(category=42).to_dict()
    elif case == "volume":
        data = book.order(volume=0).to_dict()
    elif case == "address":
        data["apprestrict"] = "0xabc"
    elif case == "missing":
        data.pop("trust")
    elif case == "other_pool":
        data = book.order(workerpool=book.devnet.app("echo")).to_dict()
    elif case == "wrong_signer":  # signed and authorized by someone who does not own the pool
        data, role = book.order(signer="requester").to_dict(), "requester"
    elif case == "tampered":
        data["volume"] = 1000
    elif case == "garbage_sign":
        data["sign"] = "0x" + "ab" * 10
    elif case == "unsigned":
        data["sign"] = "0x"
    elif case == "not_the_signer":  # the owner's good order, but the requester's login
        role = "requester"
    code, body = book.publish(data, role=role)
    assert (code, body["ok"]) == (status, False), body
    assert message in body["error"]
    assert book.listing()["count"] == 0


def test_api_body_and_chain_id_are_checked(book: Book) -> None:
    assert book.call("GET", "/workerpoolorders", params={"chainId": 1})[0] == 400
    code, body = book.call("GET", "/workerpoolorders", params={"chainId": 1})
    assert "chainId 1 is not supported" in body["error"]
    r = requests.get(f"{book.url}/workerpoolorders", timeout=10)
    assert (r.status_code, r.json()) == (400, {"ok": False, "error": "chainId is a required field"})
    code, body = book.call("POST", "/workerpoolorders", role="scheduler", data="{not json")
    assert (code, body["error"]) == (400, "the body must be a JSON object")
    code, body = book.call("POST", "/workerpoolorders", role="scheduler", json={"x": 1})
    assert (code, body["error"]) == (400, "order is a required field")
    code, body = book.call("GET", "/workerpoolorders", params={"pageSize": 5})
    assert (code, body["error"]) == (400, "pageSize must be greater than or equal to 10")
    code, body = book.call("GET", "/workerpoolorders", params={"isAppStrict": "maybe"})
    assert code == 400 and "isAppStrict must be a `boolean`" in body["error"]
    code, body = book.call("GET", "/workerpoolorders/0x1234")
    assert (code, body["error"]) == (400, "orderHash must be a bytes32 hex string")
    code, body = book.call("GET", "/workerpoolorders/0x" + "12" * 32)
    assert (code, body) == (404, {"ok": False, "error": "workerpoolorder not found"})


# ---- the challenge -----------------------------------------------------------------------------
def test_challenge_is_the_market_typed_data_and_stays_until_used(book: Book) -> None:
    address = book.devnet.address("scheduler")
    code, body = book.call("GET", "/challenge", params={"address": address})
    assert code == 200 and body["ok"] is True
    data = body["data"]
    assert data["types"] == {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
        ],
        "Challenge": [{"name": "challenge", "type": "string"}],
    }
    assert data["domain"] == {"name": "iExec Gateway", "version": "1", "chainId": book.chain_id}
    assert data["primaryType"] == "Challenge"
    assert data["message"]["challenge"].startswith(CHALLENGE_TEXT)
    # the same challenge until it is used, as the market does
    assert book.call("GET", "/challenge", params={"address": address})[1]["data"] == data
    # Authorization = EIP-712 hash of it _ its signature _ address
    header = authorization_header(data, book.devnet.key("scheduler"))
    assert header.split("_")[0] == typed_data_hash(
        challenge_typed_data(book.chain_id, data["message"]["challenge"])
    )
    code, body = book.call(
        "POST",
        "/workerpoolorders",
        json={"order": book.order().to_dict()},
        headers={"Authorization": header},
    )
    assert code == 200, body
    fresh = book.call("GET", "/challenge", params={"address": address})[1]["data"]
    assert fresh["message"] != data["message"]
    code, body = book.call("GET", "/challenge", params={"address": "0x12"})
    assert code == 400


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "missing Authorization"),
        ("malformed", "Authorization must be <hash>_<signature>_<address>"),
        ("forged_signature", "addresses mismatch"),
        ("unknown_hash", "challenge not valid"),
        ("other_address", "challenge not valid"),
        ("reused", "challenge not valid"),
        ("expired", "challenge not valid"),
        ("garbage_signature", "does not decode"),
    ],
)
def test_missing_or_forged_challenges_are_refused(book: Book, case: str, message: str) -> None:
    owner = book.devnet.address("scheduler")
    data = book.call("GET", "/challenge", params={"address": owner})[1]["data"]
    good = authorization_header(data, book.devnet.key("scheduler"))
    challenge_hash, signature, _ = good.split("_")
    headers: dict[str, str] = {}
    if case == "malformed":
        headers["Authorization"] = "Bearer abc"
    elif case == "forged_signature":  # the owner's challenge signed by another wallet
        forged = authorization_header(data, book.devnet.key("requester"))
        headers["Authorization"] = f"{challenge_hash}_{forged.split('_')[1]}_{owner}"
    elif case == "unknown_hash":
        other = challenge_typed_data(book.chain_id, CHALLENGE_TEXT + "made-up")
        headers["Authorization"] = authorization_header(other, book.devnet.key("scheduler"))
    elif case == "other_address":
        headers["Authorization"] = (
            f"{challenge_hash}_{signature}_{book.devnet.address('requester')}"
        )
    elif case == "reused":
        headers["Authorization"] = good
        code, body = book.call(
            "PUT",
            "/workerpoolorders",
            headers=headers,
            json={"target": "unpublish_all", "workerpool": book.pool},
        )
        assert code == 404, body  # the login worked (nothing to unpublish) and is spent
    elif case == "expired":
        book.orders.challenges.update_many(
            {}, {"$set": {"expiresAt": dt.datetime.now(dt.UTC).replace(tzinfo=None)}}
        )
        headers["Authorization"] = good
    elif case == "garbage_signature":
        headers["Authorization"] = f"{challenge_hash}_0xzz_{owner}"
    before = book.listing()["count"]
    code, body = book.call(
        "POST", "/workerpoolorders", headers=headers, json={"order": book.order().to_dict()}
    )
    assert (code, body["ok"]) == (401, False), body
    assert message in body["error"]
    assert book.listing()["count"] == before


@pytest.mark.parametrize("book", [("tdx",)], indirect=True)
def test_a_tee_order_of_the_stack_is_sold_with_trust_1_only(book: Book) -> None:
    code, body = book.publish(book.order(tag="tee,tdx", trust=0).to_dict())
    assert (code, body["error"]) == (400, "trust: a TEE order (tee,tdx) needs trust 1, got 0")
    # the framework is in the stack, but no node serves it yet
    code, body = book.publish(book.order(tag="tee,tdx", trust=1).to_dict())
    assert code == 400 and "no live worker node serves tee-tdx tasks" in body["error"]
    book.store.record_heartbeat("0x" + "7e" * 20, {"capabilities": ["tee-tdx"], "slots": 1})
    code, body = book.publish(book.order(tag="tee,tdx", trust=1).to_dict())
    assert code == 200, body
    # another framework stays refused
    code, body = book.publish(book.order(tag="tee,gramine", trust=1).to_dict())
    assert code == 400 and "(WORKERPOOL_TEE_STACK is tdx)" in body["error"]


def test_a_gpu_order_is_signed_and_published_while_a_gpu_node_is_alive(
    book: Book, tmp_path: Path
) -> None:
    template, signed = tmp_path / "gpu.json", tmp_path / "gpu.signed.json"
    _ok(book.cli("order", "init", "--out", str(template), "--tag", "gpu"))
    assert json.loads(template.read_text())["tag"] == GPU
    _refused(
        book.cli("order", "sign", str(template), "--out", str(signed)),
        "preflight",
        "tag: gpu: no live worker node serves gpu tasks",
    )
    assert not signed.exists()
    book.gpu_node()
    _ok(book.cli("order", "sign", str(template), "--out", str(signed)))
    out = _ok(book.cli("order", "publish", str(signed)))
    order_hash = out.split()[1]
    assert book.one(order_hash)["order"]["tag"] == GPU
    # a node heard from longer ago than WORKER_LOST_TIMEOUT does not count
    book.store.workers.update_many({}, {"$set": {"lastSeen": dt.datetime(2020, 1, 1)}})
    _refused(book.cli("order", "sign", str(template), "--out", str(signed)), "no live worker")


# ---- publication rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("book", [("scone", "gramine")], indirect=True)
def test_fifty_open_orders_per_signer_then_queries_filters_and_pages(book: Book) -> None:
    app = book.devnet.app("echo")
    requester = book.devnet.address("requester")
    published: dict[int, str] = {}
    # Given 50 open orders of assorted terms (a standard, tee,scone, tee,gramine mix)
    for framework in ("scone", "gramine"):
        book.store.record_heartbeat(
            "0x" + "7e" * 19 + framework[:1].encode().hex(),
            {"capabilities": [f"tee-{framework}"], "slots": 1},
        )
    for i in range(50):
        fields: dict[str, Any] = {
            "workerpoolprice": 100 + i,
            "volume": 1 + i % 3,
            "category": i % 2,
            "trust": 1 if i % 10 in (0, 5) else i % 4,
        }
        if i % 10 == 0:
            fields["tag"] = TEE_SCONE
        elif i % 10 == 5:
            fields["tag"] = TEE_GRAMINE
        if i == 7:
            fields["apprestrict"] = app
        if i == 8:
            fields["requesterrestrict"] = requester
        code, body = book.publish(book.order(**fields).to_dict())
        assert code == 200, body
        published[i] = body["published"]["orderHash"]
    # Then a 51st is refused
    code, body = book.publish(book.order().to_dict())
    assert code == 409
    assert "maximum of 50 published open workerpoolorders reached" in body["error"]
    anyone = {"app": "any", "dataset": "any", "requester": "any"}
    # restricted orders are listed only to whom they name (the market's default)
    assert book.listing()["count"] == 48
    assert book.listing(**anyone)["count"] == 50
    assert book.listing(app=app)["count"] == 49
    assert [o["orderHash"] for o in book.listing(app=app, isAppStrict="true")["orders"]] == [
        published[7]
    ]
    assert book.listing(requester=requester, isRequesterStrict="true")["count"] == 1
    assert book.listing(category=1, **anyone)["count"] == 25
    assert book.listing(minTag=TEE_SCONE, **anyone)["count"] == 5
    assert book.listing(minTag="tee", **anyone)["count"] == 10
    assert book.listing(maxTag="0x0", **anyone)["count"] == 40
    assert book.listing(minTag="tee", maxTag=TEE_GRAMINE, **anyone)["count"] == 5
    assert book.listing(minTrust=3, **anyone)["count"] == sum(
        1 for i in range(50) if i % 10 not in (0, 5) and i % 4 >= 3
    )
    assert book.listing(minVolume=3, **anyone)["count"] == sum(1 for i in range(50) if i % 3 == 2)
    assert book.listing(workerpool=book.pool, **anyone)["count"] == 50
    assert book.listing(workerpoolOwner=requester, **anyone)["count"] == 0
    # pages: cheapest first, nextPage only while there is one
    first = book.listing(pageSize=20, **anyone)
    assert [o["order"]["workerpoolprice"] for o in first["orders"]] == list(range(100, 120))
    assert first["count"] == 50 and first["nextPage"] == 20
    last = book.listing(pageSize=20, pageIndex=2, **anyone)
    assert len(last["orders"]) == 10 and "nextPage" not in last
    legacy = book.listing(page=40, **anyone)
    assert [o["order"]["workerpoolprice"] for o in legacy["orders"]] == list(range(140, 150))
    assert "nextPage" not in legacy
    # unpublish_last, then unpublish_all, through the API
    code, body = book.call(
        "PUT",
        "/workerpoolorders",
        role="scheduler",
        json={"target": "unpublish_last", "workerpool": book.pool},
    )
    assert (code, body["unpublished"]) == (200, [published[49]])
    code, body = book.call(
        "PUT",
        "/workerpoolorders",
        role="requester",
        json={"target": "unpublish_orderHash", "orderHash": published[0]},
    )
    assert code == 403 and "only the order signer" in body["error"]
    code, body = book.call(
        "PUT",
        "/workerpoolorders",
        role="scheduler",
        json={"target": "unpublish_all", "workerpool": book.pool},
    )
    assert code == 200 and sorted(body["unpublished"]) == sorted(published[i] for i in range(49))
    assert book.listing(**anyone)["count"] == 0
    code, body = book.call(
        "PUT",
        "/workerpoolorders",
        role="scheduler",
        json={"target": "unpublish_all", "workerpool": book.pool},
    )
    assert code == 404 and "no open workerpoolorder" in body["error"]


def test_stake_must_cover_the_workerpool_stake_of_all_open_orders(book: Book) -> None:
    stake = book.client.view_account(book.devnet.address("scheduler")).stake
    # an order alone above the stake (30% of price * volume)
    price = stake  # 30% of it per task: 4 tasks need 1.2 * stake
    code, body = book.publish(book.order(workerpoolprice=price, volume=4).to_dict())
    assert code == 409 and "stake is too low" in body["error"], body
    # two orders each within the stake, together above it
    price = 2 * stake  # 0.6 * stake per task
    assert book.publish(book.order(workerpoolprice=price).to_dict())[0] == 200
    code, body = book.publish(book.order(workerpoolprice=price).to_dict())
    assert code == 409 and "of its 1 open order(s) and this one" in body["error"]
    # the same order twice is a conflict, not a second listing
    order = book.order(workerpoolprice=1)
    assert book.publish(order.to_dict())[0] == 200
    code, body = book.publish(order.to_dict())
    assert (code, body["error"]) == (
        409,
        f"order {order.hash(book.client.domain())} is already published",
    )


def test_cli_publish_reports_the_orderbooks_refusal(book: Book, tmp_path: Path) -> None:
    stake = book.client.view_account(book.devnet.address("scheduler")).stake
    path = tmp_path / "big.json"
    path.write_text(json.dumps(book.order(workerpoolprice=stake, volume=4).to_dict()))
    _refused(book.cli("order", "publish", str(path)), "orderbook refused", "stake is too low")
    unreachable = book.cli("order", "publish", str(path), "--orderbook", "http://127.0.0.1:9")
    _refused(unreachable, "cannot reach the orderbook at http://127.0.0.1:9")


def test_cli_refuses_a_challenge_that_is_not_a_login(book: Book, tmp_path: Path) -> None:
    """A hostile orderbook must not get the owner's signature on anything but a challenge."""
    evil = Flask("evil")

    @evil.get("/challenge")
    def challenge() -> Any:
        data = book.order().typed_data(book.client.domain())  # an order in disguise
        data["message"] = {**data["message"], "challenge": "log in", "salt": "0x" + "00" * 32}
        return {"ok": True, "data": json.loads(json.dumps(data, default=str))}

    url, server = serve(evil)
    try:
        client = OrderbookClient(url, book.chain_id)
        with pytest.raises(OrderbookError, match="not an iExec Gateway login challenge"):
            client.authorization(book.devnet.key("scheduler"))
    finally:
        server.shutdown()


# ---- statuses follow the chain ------------------------------------------------------------------
def test_filled_and_cancelled_follow_the_chain(book: Book, chain_snapshot: DevnetHandle) -> None:
    full, closed, partial = book.order(volume=2), book.order(volume=3), book.order(volume=4)
    for order in (full, closed, partial):
        assert book.publish(order.to_dict())[0] == 200
    domain = book.client.domain()
    book.buy(full, 2)
    book.buy(partial, 1)
    actions.manage_order(book.devnet.wallet("scheduler"), closed, actions.CLOSE)
    assert book.one(full.hash(domain))["status"] == "filled"
    assert book.one(closed.hash(domain))["status"] == "cancelled"
    assert book.one(closed.hash(domain))["remaining"] == 0
    listed = book.listing()["orders"]
    assert [(o["orderHash"], o["remaining"]) for o in listed] == [(partial.hash(domain), 3)]


def test_dead_when_the_stake_no_longer_covers_and_when_the_pool_changes_hands(
    book: Book, chain_snapshot: DevnetHandle
) -> None:
    scheduler = book.devnet.wallet("scheduler")
    stake = book.client.view_account(scheduler.address).stake
    covered = book.order(workerpoolprice=stake)  # needs 0.3 * stake
    assert book.publish(covered.to_dict())[0] == 200
    domain = book.client.domain()
    # When the owner withdraws most of its stake, the order is dead (not listed)
    actions.withdraw(scheduler, stake // 2 + stake // 4)
    assert book.one(covered.hash(domain))["status"] == "dead"
    assert book.listing()["count"] == 0
    # And it can be published again once the stake is back
    actions.deposit(scheduler, stake)
    assert book.publish(covered.to_dict())[0] == 200
    assert book.one(covered.hash(domain))["status"] == "open"
    # When the workerpool is transferred, its previous owner's orders are dead
    registry = book.client.contract(
        "WorkerpoolRegistry", book.client.hub.functions.workerpoolregistry().call()
    )
    new_owner = book.devnet.address("app_provider")
    scheduler.transact(
        registry.functions.transferFrom(scheduler.address, new_owner, int(book.pool, 16))
    )
    assert book.client.workerpool_owner(book.pool) == new_owner
    report = sync_orders(book.orders, book.client)
    assert report.dead == [covered.hash(domain)]
    assert book.one(covered.hash(domain))["status"] == "dead"


# ---- the pool's own API ---------------------------------------------------------------------
def test_create_app_serves_the_orderbook_with_a_chain_client_built_from_settings(
    book: Book,
) -> None:
    from api.app import create_app

    app = create_app(book.settings, book.store)  # no chain client given: built on first use
    http = app.test_client()
    owner = book.devnet.address("scheduler")
    body = http.get(f"/challenge?chainId={book.chain_id}&address={owner}").get_json()
    assert body["ok"] and body["data"]["domain"]["name"] == "iExec Gateway"
    # an order published through the orderbook is visible through the app (same store)
    assert book.publish(book.order(volume=3).to_dict())[0] == 200
    listed = http.get(f"/workerpoolorders?chainId={book.chain_id}").get_json()
    assert listed["count"] == 1 and listed["orders"][0]["remaining"] == 3
    # the orderbook answers in the market's error shape, whatever the app's own shape is
    body = http.get("/workerpoolorders/0x" + "ab" * 32 + f"?chainId={book.chain_id}").get_json()
    assert body == {"ok": False, "error": "workerpoolorder not found"}


def test_orderbook_without_chain_settings_says_what_is_missing(book: Book) -> None:
    app = Flask("no-chain")
    app.register_blueprint(orderbook_blueprint(Settings(), book.store))
    r = app.test_client().get("/workerpoolorders?chainId=1")
    assert r.status_code == 503
    assert "IEXEC_PRIVATE_CHAIN_ADDRESS" in r.get_json()["error"]


def test_cli_names_missing_or_malformed_settings(tmp_path: Path) -> None:
    runner = CliRunner()
    out = str(tmp_path / "t.json")
    clean = {k: "" for k in ("POOL_ADDRESS", "WORKERPOOL_ORDER_TAG", "WORKERPOOL_ORDER_PRICE")}
    result = runner.invoke(main, ["order", "init", "--out", out], env=clean)
    assert result.exit_code == 1 and "missing required setting(s): POOL_ADDRESS" in result.output
    env = {**clean, "POOL_ADDRESS": "0x" + "11" * 20, "WORKERPOOL_ORDER_TAG": "sgx"}
    result = runner.invoke(main, ["order", "init", "--out", out], env=env)
    assert result.exit_code == 1 and "WORKERPOOL_ORDER_TAG='sgx'" in result.output
    env = {**clean, "WORKERPOOL_ORDER_PRICE": "-1"}
    result = runner.invoke(main, ["order", "init", "--out", out], env=env)
    assert result.exit_code == 1 and "WORKERPOOL_ORDER_PRICE='-1'" in result.output
    result = runner.invoke(main, ["order", "unpublish"], env=clean)
    assert result.exit_code == 1 and "give an orderHash, or --all, or --last" in result.output


def test_default_orderbook_is_the_pools_own_api() -> None:
    from cli.orders import orderbook_url

    assert orderbook_url(Settings()) == "http://127.0.0.1:18090"
    assert orderbook_url(Settings(api_host="0.0.0.0", core_port=8080)) == "http://127.0.0.1:8080"
    assert orderbook_url(Settings(public_url="https://pool.example/")) == "https://pool.example"
    market = "https://api.market.example"
    assert orderbook_url(Settings(orderbook_url=market, public_url="x://y")) == market
    assert orderbook_url(Settings(), "http://other:1/") == "http://other:1"
