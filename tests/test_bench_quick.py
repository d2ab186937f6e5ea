"""The benchmarks keep working: ``ops/bench/bench.py --quick`` runs end to end on the devnet,
real redis-server and dockerd, and writes every measurement.

Smoke test only: it checks that each figure was produced and the counts that do not depend on
the machine (every task COMPLETED on chain, initializeArray batching); it asserts no time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from devnet_fixtures import free_port

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(420)
def test_quick_benchmark_prints_the_table_and_writes_every_figure(
    redis_url: str, app_images: dict[str, str], tmp_path: Path
) -> None:
    # Given the services of ops/test, and a Redis database of the benchmark's own
    bench_redis = redis_url.rsplit("/", 1)[0] + "/7"
    out = tmp_path / "results.json"
    # When the quick variant runs
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ops" / "bench" / "bench.py"),
            "--quick",
            "--redis-url",
            bench_redis,
            "--chain-port",
            str(free_port()),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Then it prints the table
    assert "per-task overhead" in proc.stdout and "deal throughput" in proc.stdout
    assert "scheduler dispatch, 1000 tasks" in proc.stdout
    # And the JSON holds every measurement
    results = json.loads(out.read_text())
    overhead = results["overhead"]
    assert overhead["runs"] == 3 and overhead["pool_median_s"] > 0
    assert overhead["bare_docker"]["median_s"] > 0
    throughput = results["throughput"]
    assert throughput["completed_on_chain"] == throughput["tasks"] == 20
    assert throughput["pool_tasks_per_s"] > 0 and throughput["ratio_vs_bare"] > 0
    chain = throughput["chain"]
    assert chain["tx_by_function"]["initializeArray"] <= 1 / 20  # one batch for 20 tasks
    assert chain["tx_by_function"]["contributeAndFinalize"] == 1  # trust 1: one per task
    assert chain["rpc_calls_per_task"] > 0
    (scale,) = results["scale"]
    assert "error" not in scale, scale
    assert scale["dispatch"]["jobs_sent"] == 1000
    assert scale["dispatch"]["init_tx_per_task"] == pytest.approx(1 / 20)
    assert scale["lifecycle"]["transactions"]["finalize"] == 1000
    assert scale["rss_mb"]["peak"] > 0
