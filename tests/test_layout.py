"""The layer rule of docs/architecture.md, checked by import-linter (``[tool.importlinter]``
in pyproject.toml): the tree keeps it, and a wrong import breaks the build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("testing", "cli", "devnet", "scheduler", "workers", "api", "orders", "pool", "poco")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(tool), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_every_import_points_down_the_layers() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_up_the_layers_breaks_the_build(tmp_path: Path) -> None:
    # Given a copy of the tree where the shared core imports a service
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    clock = tmp_path / "pool" / "clock.py"
    clock.write_text(clock.read_text() + "\nfrom scheduler import service  # noqa: E402\n")
    # And a worker node that reads MongoDB
    node = tmp_path / "workers" / "node.py"
    node.write_text(node.read_text() + "\nfrom pool import store  # noqa: E402\n")
    # When the contracts are checked, Then both imports are named and the check fails
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pool is not allowed to import scheduler" in result.stdout
    assert "pool.clock -> scheduler.service" in result.stdout
    assert "workers.node -> pool.store" in result.stdout
