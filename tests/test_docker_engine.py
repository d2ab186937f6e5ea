"""The real Docker engine runs the local test app images the way a worker will.

No project code here: these tests pin down what the engine and the images built by
ops/apps/build do (no network, bind-mounted iexec_out/iexec_in, exit codes, logs,
removal), so the worker's container runner can rely on it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import NotFound
from docker.models.containers import Container

pytestmark = pytest.mark.docker

TEST_LABEL = {"workerpool.test": "test_docker_engine"}


@pytest.fixture
def run_app(docker_client: docker.DockerClient) -> Iterator[Any]:
    """Start an app container detached, no network, labelled; force-removed at teardown."""
    started: list[Container] = []

    def start(image: str, command: list[str] | None = None, **kwargs: Any) -> Container:
        kwargs.setdefault("network_mode", "none")
        container = docker_client.containers.run(
            image, command, detach=True, labels=TEST_LABEL, **kwargs
        )
        started.append(container)
        return container

    yield start
    for container in started:
        with contextlib.suppress(NotFound):
            container.remove(force=True)


def iexec_env(**extra: str) -> dict[str, str]:
    env = {
        "IEXEC_OUT": "/iexec_out",
        "IEXEC_IN": "/iexec_in",
        "IEXEC_INPUT_FILES_FOLDER": "/iexec_in",
        "IEXEC_TASK_ID": "0x" + "ab" * 32,
        "IEXEC_DEAL_ID": "0x" + "cd" * 32,
        "IEXEC_TASK_INDEX": "0",
        "IEXEC_BOT_SIZE": "1",
        "IEXEC_INPUT_FILES_NUMBER": "0",
    }
    env.update(extra)
    return env


def out_volume(path: Path) -> dict[str, dict[str, str]]:
    return {str(path): {"bind": "/iexec_out", "mode": "rw"}}


def test_echo_app_writes_result_and_computed_json_then_is_removed(
    docker_client: docker.DockerClient, app_images: dict[str, str], run_app: Any, tmp_path: Path
) -> None:
    # Given an empty output dir bind-mounted as /iexec_out
    out = tmp_path / "iexec_out"
    out.mkdir()

    # When the echo app runs detached with no network
    container = run_app(
        app_images["echo"], ["hello", "world"], environment=iexec_env(), volumes=out_volume(out)
    )
    status = container.wait(timeout=60)
    stdout = container.logs(stdout=True, stderr=False).decode()
    stderr = container.logs(stdout=False, stderr=True).decode()
    container.reload()
    network_mode = container.attrs["HostConfig"]["NetworkMode"]
    networks = container.attrs["NetworkSettings"]["Networks"]
    container.remove()

    # Then it exited 0, wrote its result and computed.json, and logged to stdout
    assert status["StatusCode"] == 0, stderr
    assert network_mode == "none"
    assert list(networks) == ["none"]
    assert (out / "result.txt").read_text() == (
        "args: hello world\n"
        f"IEXEC_TASK_ID=0x{'ab' * 32}\n"
        f"IEXEC_DEAL_ID=0x{'cd' * 32}\n"
        "IEXEC_TASK_INDEX=0\n"
        "IEXEC_BOT_SIZE=1\n"
        "IEXEC_INPUT_FILES_NUMBER=0\n"
    )
    assert json.loads((out / "computed.json").read_text()) == {
        "deterministic-output-path": "/iexec_out/result.txt"
    }
    assert "args: hello world" in stdout
    assert stderr == ""
    # And the container is gone
    with pytest.raises(NotFound):
        docker_client.containers.get(container.id)


def test_echo_app_reads_input_files_and_dataset(
    app_images: dict[str, str], run_app: Any, tmp_path: Path
) -> None:
    # Given two input files (one without a final newline) and a dataset in /iexec_in
    out, inp = tmp_path / "out", tmp_path / "in"
    out.mkdir()
    inp.mkdir()
    (inp / "a.txt").write_text("alpha\n")
    (inp / "b.csv").write_text("1,2,3")
    (inp / "dataset.bin").write_text("secret data\n")
    env = iexec_env(
        IEXEC_INPUT_FILES_NUMBER="2",
        IEXEC_INPUT_FILE_NAME_1="a.txt",
        IEXEC_INPUT_FILE_NAME_2="b.csv",
        IEXEC_DATASET_FILENAME="dataset.bin",
    )

    # When the echo app runs with them mounted read-only
    container = run_app(
        app_images["echo"],
        volumes={**out_volume(out), str(inp): {"bind": "/iexec_in", "mode": "ro"}},
        environment=env,
    )
    status = container.wait(timeout=60)

    # Then result.txt names and shows each file
    assert status["StatusCode"] == 0, container.logs().decode()
    assert (out / "result.txt").read_text().splitlines()[5:] == [
        "IEXEC_INPUT_FILES_NUMBER=2",
        "IEXEC_INPUT_FILE_NAME_1=a.txt",
        "alpha",
        "IEXEC_INPUT_FILE_NAME_2=b.csv",
        "1,2,3",
        "IEXEC_DATASET_FILENAME=dataset.bin",
        "secret data",
    ]


def test_container_without_network_sees_only_loopback(
    app_images: dict[str, str], run_app: Any
) -> None:
    container = run_app(app_images["echo"], ["/sys/class/net"], entrypoint=["/bin/ls"])
    assert container.wait(timeout=60)["StatusCode"] == 0
    assert container.logs().decode().split() == ["lo"]


def test_crash_app_exit_code_and_stderr_are_captured(
    app_images: dict[str, str], run_app: Any, tmp_path: Path
) -> None:
    container = run_app(app_images["crash"], environment=iexec_env(), volumes=out_volume(tmp_path))
    status = container.wait(timeout=60)

    assert status["StatusCode"] == 3
    assert container.logs(stdout=False, stderr=True).decode() == "boom: something went wrong\n"
    assert "boom" not in container.logs(stdout=True, stderr=False).decode()
    assert list(tmp_path.iterdir()) == []


def test_nocomputed_app_exits_0_without_computed_json(
    app_images: dict[str, str], run_app: Any, tmp_path: Path
) -> None:
    container = run_app(
        app_images["nocomputed"], environment=iexec_env(), volumes=out_volume(tmp_path)
    )
    assert container.wait(timeout=60)["StatusCode"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_bigout_app_writes_the_size_asked(
    app_images: dict[str, str], run_app: Any, tmp_path: Path
) -> None:
    container = run_app(
        app_images["bigout"], ["2"], environment=iexec_env(), volumes=out_volume(tmp_path)
    )
    assert container.wait(timeout=60)["StatusCode"] == 0
    assert (tmp_path / "big.bin").stat().st_size == 2 * 1024 * 1024
    assert json.loads((tmp_path / "computed.json").read_text()) == {
        "deterministic-output-path": "/iexec_out/big.bin"
    }


def test_sleep_app_finishes_or_stops_at_once(
    app_images: dict[str, str], run_app: Any, tmp_path: Path
) -> None:
    # A short sleep completes with computed.json
    short = run_app(
        app_images["sleep"], ["0"], environment=iexec_env(), volumes=out_volume(tmp_path)
    )
    assert short.wait(timeout=60)["StatusCode"] == 0
    assert (tmp_path / "computed.json").exists()

    # A long one ends on SIGTERM well before docker's grace period runs out
    long = run_app(app_images["sleep"], environment=iexec_env())
    deadline = time.monotonic() + 10
    while "sleeping" not in long.logs().decode() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    long.stop(timeout=20)
    assert time.monotonic() - started < 10
    assert long.wait(timeout=10)["StatusCode"] == 143
