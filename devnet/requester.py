"""The requester's side of a deal: build, sign and match the four orders.

Used by the devnet demo, the tests and the benchmarks to buy the pool's capacity the way the
iExec SDK does (app order by the app owner, workerpool order by the scheduler, request order by
the requester, then ``matchOrders``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from poco import actions
from poco.chain import ChainClient, Receipt
from poco.orders import AppOrder, DatasetOrder, RequestOrder, WorkerpoolOrder, random_salt
from poco.proofs import task_id


@dataclass(frozen=True)
class MatchedDeal:
    dealid: str
    receipt: Receipt
    apporder: AppOrder
    workerpoolorder: WorkerpoolOrder
    requestorder: RequestOrder
    datasetorder: DatasetOrder | None
    bot_first: int
    volume: int

    def taskids(self) -> list[str]:
        return [
            task_id(self.dealid, i) for i in range(self.bot_first, self.bot_first + self.volume)
        ]


def deal_params(
    args: str | None = None,
    input_files: list[str] | None = None,
    **extra: Any,
) -> str:
    """The deal ``params`` JSON that iexec-worker reads (``iexec_args``, ``iexec_input_files``)."""
    params: dict[str, Any] = {}
    if args is not None:
        params["iexec_args"] = args
    if input_files:
        params["iexec_input_files"] = list(input_files)
    params.update(extra)
    return json.dumps(params, separators=(",", ":")) if params else ""


def match_deal(
    client: ChainClient,
    *,
    app: str,
    app_owner_key: str,
    workerpool: str,
    scheduler_key: str,
    requester_key: str,
    volume: int = 1,
    category: int = 0,
    trust: int = 1,
    tag: str = "0x" + "00" * 32,
    appprice: int = 0,
    workerpoolprice: int = 0,
    params: str = "",
    callback: str = "0x" + "00" * 20,
    workerpoolorder: WorkerpoolOrder | None = None,
    dataset: str | None = None,
    dataset_owner_key: str | None = None,
    datasetprice: int = 0,
) -> MatchedDeal:
    """Sign and match fresh orders (random salts) for one deal; return its dealid."""
    domain = client.domain()
    requester_wallet = client.wallet(requester_key)
    apporder = AppOrder(app=app, appprice=appprice, volume=volume, tag=tag, salt=random_salt())
    apporder = apporder.signed(app_owner_key, domain)
    datasetorder = None
    if dataset is not None:
        assert dataset_owner_key is not None, "a dataset order needs its owner's key"
        datasetorder = DatasetOrder(
            dataset=dataset, datasetprice=datasetprice, volume=volume, tag=tag, salt=random_salt()
        ).signed(dataset_owner_key, domain)
    if workerpoolorder is None:
        workerpoolorder = WorkerpoolOrder(
            workerpool=workerpool,
            workerpoolprice=workerpoolprice,
            volume=volume,
            tag=tag,
            category=category,
            trust=trust,
            salt=random_salt(),
        ).signed(scheduler_key, domain)
    requestorder = RequestOrder(
        app=app,
        appmaxprice=appprice,
        dataset=dataset or "0x" + "00" * 20,
        datasetmaxprice=datasetprice,
        workerpool=workerpool,
        workerpoolmaxprice=workerpoolorder.workerpoolprice,
        requester=requester_wallet.address,
        volume=volume,
        tag=tag,
        category=category,
        trust=trust,
        beneficiary=requester_wallet.address,
        callback=callback,
        params=params,
        salt=random_salt(),
    ).signed(requester_key, domain)
    dealid, receipt = actions.match_orders(
        requester_wallet, apporder, datasetorder, workerpoolorder, requestorder
    )
    deal = client.view_deal(dealid)
    return MatchedDeal(
        dealid=dealid,
        receipt=receipt,
        apporder=apporder,
        workerpoolorder=workerpoolorder,
        requestorder=requestorder,
        datasetorder=datasetorder,
        bot_first=deal.bot_first,
        volume=deal.bot_size,
    )
