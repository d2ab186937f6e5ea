"""A client of an orderbook over HTTP, in the iExec market API's shape (``/challenge``,
``/workerpoolorders``): the pool's own or any market-compatible one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import requests
from eth_account import Account

from orders.challenge import authorization_header, challenge_typed_data
from orders.rules import OrderbookError


class OrderbookClient:
    """A client of the market API's workerpool order routes, with its challenge login."""

    def __init__(
        self,
        url: str,
        chain_id: int,
        *,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.chain_id = chain_id
        self.timeout = timeout
        self.session = session or requests.Session()

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        query = {"chainId": self.chain_id, **(params or {})}
        try:
            response = self.session.request(
                method,
                f"{self.url}{path}",
                params=query,
                json=body,
                headers=headers,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise OrderbookError(f"cannot reach the orderbook at {self.url}: {exc}", 503) from exc
        try:
            data = response.json()
        except ValueError as exc:
            raise OrderbookError(
                f"{method} {self.url}{path}: HTTP {response.status_code}, not a JSON answer",
                response.status_code,
            ) from exc
        if not response.ok or not isinstance(data, dict) or not data.get("ok"):
            message = data.get("error") if isinstance(data, dict) else None
            raise OrderbookError(
                f"orderbook refused: {message or f'HTTP {response.status_code}'}",
                response.status_code,
            )
        return data

    def authorization(self, private_key: str) -> str:
        """Sign the orderbook's challenge; refuse anything that is not exactly a challenge.

        The server chooses what we sign with the pool owner's key, so the typed data is
        rebuilt from our own template and compared: a hostile orderbook cannot make us sign
        an order or a token permit in disguise.
        """
        address = Account.from_key(private_key).address
        data = self._call("GET", "/challenge", params={"address": address})["data"]
        text = (data.get("message") or {}).get("challenge") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise OrderbookError("the orderbook's challenge has no message.challenge text")
        expected = challenge_typed_data(self.chain_id, text)
        served = {**data, "domain": {**data.get("domain", {})}}
        with contextlib.suppress(TypeError, ValueError):
            served["domain"]["chainId"] = int(served["domain"].get("chainId"))
        if served != expected:
            raise OrderbookError(
                "the orderbook's challenge is not an iExec Gateway login challenge for chain "
                f"{self.chain_id}; refusing to sign it"
            )
        return authorization_header(expected, private_key)

    def publish(self, order: dict[str, Any], private_key: str) -> dict[str, Any]:
        headers = {"Authorization": self.authorization(private_key)}
        published: dict[str, Any] = self._call(
            "POST", "/workerpoolorders", body={"order": order}, headers=headers
        )["published"]
        return published

    def unpublish(
        self,
        private_key: str,
        target: str,
        *,
        order_hash: str | None = None,
        workerpool: str | None = None,
    ) -> list[str]:
        body: dict[str, Any] = {"target": target}
        if order_hash:
            body["orderHash"] = order_hash
        if workerpool:
            body["workerpool"] = workerpool
        headers = {"Authorization": self.authorization(private_key)}
        hashes: list[str] = self._call("PUT", "/workerpoolorders", body=body, headers=headers)[
            "unpublished"
        ]
        return hashes

    def order(self, order_hash: str) -> dict[str, Any]:
        return self._call("GET", f"/workerpoolorders/{order_hash}")

    def orders(self, page_size: int = 100, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every order matching ``filters``, page by page."""
        page = 0
        seen = 0
        while True:
            params = {k: v for k, v in filters.items() if v is not None}
            data = self._call(
                "GET",
                "/workerpoolorders",
                params={**params, "pageIndex": page, "pageSize": page_size},
            )
            batch = data.get("orders") or []
            yield from batch
            seen += len(batch)
            if not batch or seen >= int(data.get("count", 0)):
                return
            page += 1
