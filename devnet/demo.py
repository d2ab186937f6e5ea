"""``workerpool demo``: buy a deal on the devnet and follow it to the end through the API.

``ops/demo`` starts the services; this is the requester's and the operator's side: it signs
and matches a deal of the sample app, shows each task's progress as the status API reports
it, then prints for each task its on-chain status, its result link and where to look.
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path
from typing import Any

import click
import requests

from devnet.network import Devnet
from devnet.requester import deal_params, match_deal
from poco.chain import ChainClient
from poco.results import parse_result_link
from poco.types import ChainTaskStatus

FINAL = {"COMPLETED", "FAILED"}


def run_demo(devnet_dir: Path, api_url: str, volume: int = 3, timeout: float = 300) -> int:
    info = Devnet(devnet_dir).load()
    if info is None:
        raise click.ClickException(f"no devnet in {devnet_dir}")
    client = ChainClient(info["rpc_url"], info["hub"])
    accounts = info["accounts"]
    started = time.monotonic()
    deal = match_deal(
        client,
        app=info["apps"]["echo"]["address"],
        app_owner_key=accounts["app_provider"]["private_key"],
        workerpool=info["workerpool"],
        scheduler_key=accounts["scheduler"]["private_key"],
        requester_key=accounts["requester"]["private_key"],
        volume=volume,
        trust=1,
        params=deal_params("hello from the workerpool demo"),
    )
    matched_at = time.monotonic()
    click.echo(f"matched deal {deal.dealid} ({volume} tasks) in block {deal.receipt.block_number}")
    taskids = deal.taskids()
    seen: dict[str, str] = {}
    done_at: dict[str, float] = {}
    while time.monotonic() - matched_at < timeout:
        for taskid in taskids:
            status = _api_status(api_url, taskid)
            if status and seen.get(taskid) != status:
                seen[taskid] = status
                elapsed = time.monotonic() - matched_at
                click.echo(f"  [{elapsed:6.1f}s] task {taskid[:12]}… {status}")
            if taskid not in done_at and client.view_task(taskid).status in (
                ChainTaskStatus.COMPLETED,
                ChainTaskStatus.FAILED,
            ):
                done_at[taskid] = time.monotonic()
        if len(done_at) == len(taskids) and all(seen.get(t) in FINAL for t in taskids):
            break
        time.sleep(0.25)
    click.echo("")
    ok = True
    for taskid in taskids:
        chain = client.view_task(taskid)
        ok &= chain.status == ChainTaskStatus.COMPLETED
        link = chain.results.decode(errors="replace") or "(none)"
        took = f"{done_at[taskid] - matched_at:.1f}s" if taskid in done_at else "unfinished"
        click.echo(f"task {taskid}")
        click.echo(f"  on chain : {chain.status.name} ({took} after matchOrders)")
        click.echo(f"  result   : {link}")
        click.echo(f"  API      : {api_url}/api/v1/tasks/{taskid}")
        preview = _result_preview(link)
        if preview:
            click.echo(f"  output   : {preview}")
    total = time.monotonic() - started
    click.echo(f"\npool status: {api_url}/api/v1/pool   deal: {api_url}/api/v1/deals/{deal.dealid}")
    click.echo(f"demo deal {'COMPLETED' if ok else 'NOT COMPLETED'} in {total:.1f}s")
    return 0 if ok else 1


def _result_preview(link: str) -> str:
    """First line of the app's result.txt, read back through the link (local storage)."""
    try:
        storage, location = parse_result_link(link)
        if storage != "local":
            return ""
        r = requests.get(location, timeout=5)
        r.raise_for_status()
        text = zipfile.ZipFile(io.BytesIO(r.content)).read("result.txt").decode()
    except (ValueError, KeyError, requests.RequestException, zipfile.BadZipFile):
        return ""
    return text.splitlines()[0] if text else ""


def _api_status(api_url: str, taskid: str) -> str | None:
    try:
        r = requests.get(f"{api_url}/api/v1/tasks/{taskid}", timeout=5)
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    body: dict[str, Any] = r.json()
    return str(body.get("status"))
