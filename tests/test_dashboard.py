"""The dashboard in a real browser during an end-to-end run: Debian's chromium (headless, no
sandbox, no background networking), driven by Playwright, watches a deal's tasks appear and
reach COMPLETED as the page's script polls the API; a screenshot is kept under test-output/.

No browser is downloaded: Playwright only drives the chromium that `ops/test` installs from
Debian (`executable_path`), never `playwright install`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from api_support import serve
from playwright.sync_api import expect, sync_playwright
from pool_fixtures import RunningPool

from api.app import create_app
from devnet.requester import deal_params
from orders.client import OrderbookClient
from orders.rules import template_from_settings
from poco.orders import random_salt

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "test-output"
CHROMIUM_FLAGS = [
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        from conftest import require_service

        require_service("chromium", "Debian's chromium is not installed (ops/test installs it)")
    return path


def test_dashboard_shows_tasks_reach_completed_in_a_real_browser(
    running_pool: RunningPool, chromium: str, tmp_path: Path
) -> None:
    pool = running_pool
    devnet = pool.devnet
    worker = pool.worker_address(0)
    # Given a pool with one worker, an order on its orderbook, and the API serving it
    pool.start_worker(0)
    app = create_app(pool.scheduler.settings, pool.store)
    errors: list[str] = []
    with serve(app) as url, sync_playwright() as playwright:
        order = replace(
            template_from_settings(pool.scheduler.settings), volume=10, salt=random_salt()
        ).signed(devnet.key("scheduler"), devnet.client.domain())
        OrderbookClient(url, int(devnet.client.chain_id)).publish(
            order.to_dict(), devnet.key("scheduler")
        )
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=chromium,
            headless=True,
            chromium_sandbox=False,  # --no-sandbox: root in a container
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            # When the dashboard is open before the deal exists
            page.goto(url + "/")
            expect(page.locator("#live")).to_have_text("live", timeout=15_000)
            expect(page.locator("#tasks tbody tr.empty")).to_have_count(1)
            worker_row = page.locator(f'#workers tr[data-address="{worker}"]')
            expect(worker_row.locator("td.status")).to_have_text("ALIVE")
            expect(page.locator("#orders tbody tr[data-orderhash]")).to_have_count(1)
            expect(page.locator("#orders td.remaining")).to_have_text("10 / 10")
            deal = pool.match(volume=2, trust=1, params=deal_params("hello browser"))

            # Then the page's polling shows each task, up to COMPLETED, without a reload
            for taskid in deal.taskids():
                status = page.locator(f'#tasks tr[data-taskid="{taskid}"] td.status')
                expect(status).to_have_text("COMPLETED", timeout=120_000)
            expect(page.locator("#tasks-total")).to_have_text("2")
            expect(page.locator("#workers-alive")).to_have_text("1")
            expect(worker_row.locator("td.age")).to_have_text(re.compile(r"^\d+\.\d s$"))
            assert page.locator("#chain-id").inner_text() == str(devnet.client.chain_id)
            assert page.locator("#error").is_hidden()
            OUTPUT.mkdir(exist_ok=True)
            page.screenshot(path=str(OUTPUT / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert (OUTPUT / "dashboard.png").stat().st_size > 10_000
    # and the store agrees with what the browser saw
    assert all((pool.store.task(t) or {}).get("status") == "COMPLETED" for t in deal.taskids())
