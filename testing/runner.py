"""A :class:`~workers.runner.ContainerRunner` without Docker, for unit tests of the replicate
flow."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace

from workers.runner import IEXEC_OUT, AppImageError, AppRun, RunOutcome

Behaviour = Callable[[AppRun], RunOutcome]


def default_fake_behaviour(run: AppRun) -> RunOutcome:
    """A well-behaved app: ``result.txt`` (deterministic for the same args and task) and a
    ``computed.json`` pointing at it, exit 0."""
    out = run.output_dir
    (out / "result.txt").write_text(f"fake result: task {run.task_id} args {' '.join(run.args)}\n")
    (out / "computed.json").write_text(
        json.dumps({"deterministic-output-path": f"{IEXEC_OUT}/result.txt"})
    )
    return RunOutcome(exit_code=0, stdout="fake app: done\n", log_tail="fake app: done\n")


class FakeRunner:
    """:class:`ContainerRunner` without Docker, for unit tests of the replicate flow.

    ``behaviour(run)`` plays the app: it may write into ``run.output_dir`` and returns the
    outcome. Images in ``missing_images`` raise :class:`AppImageError`. Every call is recorded.
    """

    def __init__(
        self, behaviour: Behaviour | None = None, *, missing_images: tuple[str, ...] = ()
    ) -> None:
        self.behaviour: Behaviour = behaviour or default_fake_behaviour
        self.missing_images = set(missing_images)
        self.runs: list[AppRun] = []
        self.images: list[str] = []
        self.killed: list[str] = []
        self.leftover_selectors: list[dict[str, str]] = []

    def ensure_image(self, image: str) -> None:
        self.images.append(image)
        if image in self.missing_images:
            raise AppImageError(f"app image {image} is not on this worker and could not be pulled")

    def run(self, run: AppRun) -> RunOutcome:
        self.runs.append(run)
        if run.image in self.missing_images:
            raise AppImageError(f"app image {run.image} is not on this worker")
        run.input_dir.mkdir(parents=True, exist_ok=True)
        run.output_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        outcome = self.behaviour(run)
        if not outcome.duration:
            outcome = replace(outcome, duration=time.monotonic() - started)
        return outcome

    def remove_leftovers(self, label_selector: dict[str, str]) -> int:
        self.leftover_selectors.append(dict(label_selector))
        return 0

    def kill(self, name: str) -> bool:
        self.killed.append(name)
        return False
