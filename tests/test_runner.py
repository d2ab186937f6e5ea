"""DockerRunner against the real Docker Engine and the local test app images.

Each test checks what a worker relies on: the app sees iExec's env, args and input files;
every limit (time, output size, memory) stops the app with a clear reason; the container
is gone afterwards whatever happened, even on KeyboardInterrupt; and an app cannot make
the worker hash or zip files of the host.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import json
import os
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import ImageNotFound, NotFound
from engine_support import Registry

from testing.runner import FakeRunner
from workers import inputs, mounts, results
from workers import runner as runner_mod
from workers.results import ResultError
from workers.runner import (
    AppImageError,
    AppRun,
    ContainerRunner,
    DockerRunner,
    EngineError,
    RunOutcome,
    dir_size,
)

pytestmark = pytest.mark.docker

MB = 1024 * 1024
DEAL_ID = "0x" + "cd" * 32
# every container of this session carries it, so the session cleans only its own
SESSION = uuid.uuid4().hex[:12]
SESSION_LABEL = {"workerpool.test": f"test_runner-{SESSION}"}
# a tag of its own per session: concurrent sessions on one engine never remove each other's
SHELL_REPOSITORY, SHELL_TAG = "workerpool-test/runner-shell", SESSION


@pytest.fixture(scope="session")
def docker_runner(docker_client: docker.DockerClient) -> Iterator[DockerRunner]:
    """A runner on the test engine; whatever this session left is removed at the end."""
    docker_runner = DockerRunner(docker_client, poll_interval=0.1)
    yield docker_runner
    docker_runner.remove_leftovers(SESSION_LABEL)


@pytest.fixture(scope="session")
def shell_image(docker_client: docker.DockerClient, app_images: dict[str, str]) -> Iterator[str]:
    """An image whose ENTRYPOINT is ``/bin/sh -c``: the app is the first argument.

    Made by committing a container of the busybox echo image with another entrypoint
    (no registry, no build context); removed at the end of the session.
    """
    base = docker_client.containers.create(app_images["echo"], network_mode="none")
    try:
        base.commit(
            repository=SHELL_REPOSITORY,
            tag=SHELL_TAG,
            changes=['ENTRYPOINT ["/bin/sh", "-c"]', 'CMD ["true"]'],
        )
    finally:
        base.remove(force=True)
    image = f"{SHELL_REPOSITORY}:{SHELL_TAG}"
    yield image
    with contextlib.suppress(docker.errors.APIError):
        docker_client.images.remove(image, force=True)


def new_task_id() -> str:
    return "0x" + uuid.uuid4().hex + uuid.uuid4().hex


def make_run(tmp_path: Path, image: str, args: list[str], **overrides: Any) -> AppRun:
    task_id = overrides.pop("task_id", new_task_id())
    fields: dict[str, Any] = {
        "task_id": task_id,
        "deal_id": DEAL_ID,
        "task_index": 0,
        "bot_first": 0,
        "bot_size": 1,
        "image": image,
        "args": args,
        "input_dir": tmp_path / "iexec_in",
        "output_dir": tmp_path / "iexec_out",
        "env": inputs.app_env(
            deal_id=DEAL_ID, task_id=task_id, task_index=0, bot_first=0, bot_size=1
        ),
        "timeout": 60.0,
        "memory_bytes": 64 * MB,
        "nano_cpus": 1_000_000_000,
        "output_limit_bytes": 10 * MB,
        "name": f"wp-test-{task_id[2:20]}",
        "labels": dict(SESSION_LABEL),
    }
    fields.update(overrides)
    return AppRun(**fields)


def assert_gone(client: docker.DockerClient, name: str) -> None:
    with pytest.raises(NotFound):
        client.containers.get(name)


@pytest.fixture
def http_files() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A real HTTP server on 127.0.0.1 serving a dict of path -> bytes."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()
    httpd.server_close()


# --- the happy path ------------------------------------------------------------------


def test_echo_app_end_to_end(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    http_files: tuple[str, dict[str, bytes]],
    tmp_path: Path,
) -> None:
    # Given deal params with quoted args and two input files served over HTTP
    base, files = http_files
    files.update({"/a.txt": b"alpha\n", "/b.csv": b"1,2,3"})
    urls = [f"{base}/a.txt", f"{base}/b.csv"]
    params = inputs.parse_deal_params(
        json.dumps({"iexec_args": 'hello "big world"', "iexec_input_files": urls})
    )
    task_id = new_task_id()
    in_dir, out_dir = tmp_path / "iexec_in", tmp_path / "iexec_out"
    # (the server is on 127.0.0.1, which only devnets and tests allow)
    names = inputs.download_inputs(
        params.iexec_input_files,
        in_dir,
        max_bytes=MB,
        timeout=10,
        policy=inputs.AddressPolicy(allow_private=True),
    )
    env = inputs.app_env(
        deal_id=DEAL_ID,
        task_id=task_id,
        task_index=4,
        bot_first=3,
        bot_size=2,
        input_file_names=names,
    )
    run = make_run(
        tmp_path,
        app_images["echo"],
        inputs.split_args(params.iexec_args),
        task_id=task_id,
        env=env,
        task_index=4,
    )
    docker_runner.ensure_image(run.image)

    # When the echo app runs
    outcome = docker_runner.run(run)

    # Then it succeeded and saw the args, the env and the files
    assert outcome.ok, outcome
    assert outcome.exit_code == 0 and outcome.error is None
    assert "echo app: args: hello big world" in outcome.stdout
    assert outcome.stderr == ""
    assert "wrote /iexec_out/result.txt" in outcome.log_tail
    assert (out_dir / "result.txt").read_text().splitlines() == [
        "args: hello big world",
        f"IEXEC_TASK_ID={task_id}",
        f"IEXEC_DEAL_ID={DEAL_ID}",
        "IEXEC_TASK_INDEX=4",
        "IEXEC_BOT_SIZE=2",
        "IEXEC_INPUT_FILES_NUMBER=2",
        f"IEXEC_INPUT_FILE_NAME_1={names[0]}",
        "alpha",
        f"IEXEC_INPUT_FILE_NAME_2={names[1]}",
        "1,2,3",
    ]
    # And the container is gone
    assert_gone(docker_client, run.name)

    # When the worker's post-compute steps run on its output
    results.write_logs(out_dir, outcome.stdout, outcome.stderr)
    computed = results.read_computed(out_dir)
    digest = results.result_digest(out_dir, computed, has_callback=False)
    zip_path = results.package(out_dir, tmp_path / "result.zip", max_bytes=MB)

    # Then the digest is the sha256 of result.txt and the zip holds the output and the logs
    expected = hashlib.sha256((out_dir / "result.txt").read_bytes()).hexdigest()
    assert digest == "0x" + expected
    with zipfile.ZipFile(zip_path) as archive:
        assert sorted(archive.namelist()) == ["computed.json", "result.txt", "stdout.txt"]
        assert archive.read("stdout.txt").decode() == outcome.stdout


def test_container_is_confined_and_can_be_aborted(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    # Given a long app running in a thread
    run = make_run(
        tmp_path, app_images["sleep"], ["60"], memory_bytes=48 * MB, nano_cpus=500_000_000
    )
    box: dict[str, RunOutcome] = {}
    thread = threading.Thread(target=lambda: box.update(outcome=docker_runner.run(run)))
    thread.start()
    try:
        attrs = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(NotFound):
                container = docker_client.containers.get(run.name)
                if container.status == "running":
                    attrs = container.attrs
                    break
            time.sleep(0.05)
        assert attrs is not None, "the app container never ran"

        # Then it runs with no network, no capabilities, and the limits asked
        host = attrs["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert host["Privileged"] is False
        assert host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["Memory"] == host["MemorySwap"] == 48 * MB
        assert host["NanoCpus"] == 500_000_000
        assert host["PidsLimit"] == 512
        assert host["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-file": "1", "max-size": str(10 * MB)},
        }
        assert sorted(host["Binds"]) == sorted(
            [f"{run.input_dir.resolve()}:/iexec_in:ro", f"{run.output_dir.resolve()}:/iexec_out:rw"]
        )
        assert attrs["Config"]["User"] == ""
        assert attrs["Config"]["Labels"]["workerpool.task"] == run.task_id
        assert attrs["Config"]["Cmd"] == ["60"]

        # When the task is aborted
        assert docker_runner.kill(run.name) is True
    finally:
        thread.join(timeout=30)

    # Then the run ends at once, reported as aborted, and the container is gone
    outcome = box["outcome"]
    assert outcome.aborted and not outcome.ok
    assert outcome.reason() == "app was stopped on request (task aborted)"
    assert outcome.duration < 15
    assert_gone(docker_client, run.name)
    assert docker_runner.kill(run.name) is False


def test_empty_args_keep_the_image_cmd(
    docker_runner: DockerRunner, shell_image: str, tmp_path: Path
) -> None:
    # the shell image's CMD is ["true"]: with no args, `sh -c true` exits 0
    outcome = docker_runner.run(make_run(tmp_path, shell_image, []))
    assert outcome.exit_code == 0


def test_the_run_ends_when_the_app_exits_not_at_the_next_check(
    docker_client: docker.DockerClient, app_images: dict[str, str], tmp_path: Path
) -> None:
    # Given a runner that measures the output only every 30 s
    slow_checks = DockerRunner(docker_client, poll_interval=30.0)
    run = make_run(tmp_path, app_images["sleep"], ["1"])
    started = time.monotonic()

    # When an app that runs for 1 s ends
    outcome = slow_checks.run(run)

    # Then the run returns right after it (the runner waits on the engine, it does not
    # sleep until its next check), with the exit code the engine reported
    assert outcome.ok, outcome
    assert 1.0 <= outcome.duration < 5
    assert time.monotonic() - started < 10
    assert_gone(docker_client, run.name)


def test_the_time_limit_holds_between_two_output_checks(
    docker_client: docker.DockerClient, app_images: dict[str, str], tmp_path: Path
) -> None:
    # Given output checks every 30 s and a time limit of 2 s
    slow_checks = DockerRunner(docker_client, poll_interval=30.0)
    run = make_run(tmp_path, app_images["sleep"], ["60"], timeout=2.0)

    outcome = slow_checks.run(run)

    # Then the app is stopped at its time limit, not at the next output check
    assert outcome.timed_out and not outcome.ok
    assert 2.0 <= outcome.duration < 8
    assert_gone(docker_client, run.name)


# --- failures --------------------------------------------------------------------------


def test_crash_app_exit_code_and_logs(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path, app_images["crash"], [])
    outcome = docker_runner.run(run)

    assert outcome.exit_code == 3
    assert not outcome.ok
    assert outcome.reason() == "app exited with code 3"
    assert "boom" in outcome.log_tail
    assert outcome.stderr == "boom: something went wrong\n"
    assert "boom" not in outcome.stdout
    assert_gone(docker_client, run.name)


def test_output_over_the_limit_stops_the_app(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    # Given a 5 MB output limit and an app writing 200 MB
    run = make_run(tmp_path, app_images["bigout"], ["200"], output_limit_bytes=5 * MB)

    outcome = docker_runner.run(run)

    assert outcome.output_too_large and not outcome.ok
    assert outcome.reason() == "app output exceeded the limit of 5 MB and was stopped"
    assert_gone(docker_client, run.name)


def test_a_steady_writer_is_stopped_while_it_runs(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    shell_image: str,
    tmp_path: Path,
) -> None:
    # Given an app that would write 1 MB every 50 ms for a minute, and a 5 MB output limit
    script = "i=0; while [ $i -lt 1200 ]; do head -c 1048576 /dev/zero >> /iexec_out/f; " \
        "i=$((i+1)); sleep 0.05; done"  # fmt: skip
    run = make_run(tmp_path, shell_image, [script], output_limit_bytes=5 * MB)

    outcome = docker_runner.run(run)

    # Then the output watch kills it within seconds, long before its time limit
    assert outcome.output_too_large and not outcome.timed_out and not outcome.ok
    assert outcome.duration < 15
    assert (tmp_path / "iexec_out" / "f").stat().st_size < 200 * MB
    assert_gone(docker_client, run.name)


def test_app_past_its_time_limit_is_stopped(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path, app_images["sleep"], ["60"], timeout=2.0)
    started = time.monotonic()

    outcome = docker_runner.run(run)

    assert outcome.timed_out and not outcome.ok
    assert time.monotonic() - started < 8
    assert 2.0 <= outcome.duration < 8
    assert outcome.reason() == "app ran past its time limit of 2 s and was stopped"
    assert "sleeping 60s" in outcome.log_tail
    assert_gone(docker_client, run.name)


def test_app_over_its_memory_limit_is_oom_killed(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    shell_image: str,
    tmp_path: Path,
) -> None:
    # dd allocates its block size: 300 MB under a 32 MB limit (swap included)
    run = make_run(
        tmp_path,
        shell_image,
        ["exec dd if=/dev/zero of=/dev/null bs=300M count=1"],
        memory_bytes=32 * MB,
    )

    outcome = docker_runner.run(run)

    assert outcome.oom_killed and not outcome.ok
    assert outcome.exit_code == 137
    assert outcome.reason() == "app killed: out of memory (limit 32 MB)"
    assert_gone(docker_client, run.name)


def test_missing_image_is_an_app_image_error(
    docker_client: docker.DockerClient, docker_runner: DockerRunner, tmp_path: Path
) -> None:
    image = f"workerpool-apps/missing-{uuid.uuid4().hex[:8]}:1"
    with pytest.raises(AppImageError, match="could not be pulled"):
        docker_runner.ensure_image(image)
    run = make_run(tmp_path, image, [])
    with pytest.raises(AppImageError, match="not on this worker"):
        docker_runner.run(run)
    assert_gone(docker_client, run.name)
    with pytest.raises(ImageNotFound):
        docker_client.images.get(image)


def test_app_without_computed_json_fails_post_compute(
    docker_runner: DockerRunner, app_images: dict[str, str], tmp_path: Path
) -> None:
    run = make_run(tmp_path, app_images["nocomputed"], [])
    assert docker_runner.run(run).ok
    with pytest.raises(ResultError, match="computed.json"):
        results.read_computed(run.output_dir)


# --- cleanup ---------------------------------------------------------------------------


def test_remove_leftovers_removes_only_the_matching_containers(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
) -> None:
    # Given containers left by a crashed worker (one running) and one of another worker
    worker = f"0x{uuid.uuid4().hex[:16]}"
    mine = {**SESSION_LABEL, "workerpool.worker": worker}
    other = {**SESSION_LABEL, "workerpool.worker": worker + "ff"}
    left = [
        docker_client.containers.create(
            app_images["sleep"], ["60"], labels={**mine, "workerpool.task": new_task_id()}
        )
        for _ in range(2)
    ]
    left[0].start()
    kept = docker_client.containers.create(app_images["sleep"], ["60"], labels=other)
    try:
        # When the worker starts again
        removed = docker_runner.remove_leftovers({"workerpool.worker": worker})

        # Then its containers are gone and the other worker's is not
        assert removed == 2
        for container in left:
            assert_gone(docker_client, container.id)
        docker_client.containers.get(kept.id)
    finally:
        kept.remove(force=True)
    with pytest.raises(ValueError):
        docker_runner.remove_leftovers({})


def test_a_container_left_with_the_same_name_is_replaced(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path, app_images["echo"], ["again"])
    stale = docker_client.containers.create(
        app_images["sleep"], name=run.name, labels=SESSION_LABEL
    )

    outcome = docker_runner.run(run)

    assert outcome.ok, outcome
    assert_gone(docker_client, stale.id)
    assert_gone(docker_client, run.name)


def test_keyboard_interrupt_in_the_watchdog_still_removes_the_container(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a watchdog interrupted (Ctrl-C) while it waits for the running app
    run = make_run(tmp_path, app_images["sleep"], ["60"])
    seen: list[str] = []

    def interrupted(container: object, timeout: float) -> int | None:
        seen.append(docker_client.containers.get(run.name).status)
        raise KeyboardInterrupt

    monkeypatch.setattr(DockerRunner, "_wait", staticmethod(interrupted))

    # When it runs, the interrupt propagates
    with pytest.raises(KeyboardInterrupt):
        docker_runner.run(run)

    # Then the container existed (it was running) and is gone all the same
    assert seen == ["running"]
    assert_gone(docker_client, run.name)


# --- an app trying to escape /iexec_out -----------------------------------------------------


def test_app_symlinks_to_the_host_are_neither_hashed_nor_zipped(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    shell_image: str,
    tmp_path: Path,
) -> None:
    # Given an app that links /etc/passwd into its output and points computed.json
    # outside /iexec_out
    script = (
        "ln -s /etc/passwd /iexec_out/passwd && echo ok > /iexec_out/result.txt && "
        'printf \'{"deterministic-output-path":"/iexec_out/../etc/passwd"}\' '
        "> /iexec_out/computed.json"
    )
    run = make_run(tmp_path, shell_image, [script])
    outcome = docker_runner.run(run)
    assert outcome.ok, outcome
    out = run.output_dir
    assert (out / "passwd").is_symlink()

    # Then the digest refuses the path, and the symlinked path too
    computed = results.read_computed(out)
    with pytest.raises(ResultError, match="escapes /iexec_out"):
        results.result_digest(out, computed, has_callback=False)
    with pytest.raises(ResultError, match="escapes /iexec_out"):
        results.result_digest(
            out,
            results.ComputedFile(deterministic_output_path="/iexec_out/passwd"),
            has_callback=False,
        )
    # And the zip stores the link as an empty entry, not the host's /etc/passwd
    zip_path = results.package(out, tmp_path / "result.zip", max_bytes=MB)
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.read("passwd") == b""
        assert archive.read("result.txt") == b"ok\n"
    assert_gone(docker_client, run.name)


# --- no engine ------------------------------------------------------------------------------


def test_an_engine_that_does_not_answer_is_a_retryable_engine_error(tmp_path: Path) -> None:
    client = docker.DockerClient(base_url=f"unix://{tmp_path}/no-docker.sock", version="1.41")
    docker_runner = DockerRunner(client)
    with pytest.raises(EngineError) as caught:
        docker_runner.ensure_image("workerpool-apps/echo:1")
    assert caught.value.retryable
    with pytest.raises(EngineError):
        docker_runner.run(make_run(tmp_path, "workerpool-apps/echo:1", []))


def test_both_runners_are_container_runners() -> None:
    assert isinstance(DockerRunner(), ContainerRunner)
    assert isinstance(FakeRunner(), ContainerRunner)


# --- the hard limits (issue 17) ----------------------------------------------------------------


@pytest.fixture
def mounted_output(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/iexec_out`` on a tmpfs of 5 MB, as a worker node mounts it."""
    out = tmp_path / "iexec_out"
    out.mkdir()
    mounts.mount_tmpfs(out, 5 * MB)
    yield out
    mounts.unmount(out)


def test_a_writer_as_fast_as_it_can_writes_at_most_the_limit(
    docker_client: docker.DockerClient,
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    tmp_path: Path,
    mounted_output: Path,
) -> None:
    # Given an app writing 1 GB with dd, and a 5 MB output on a filesystem of its own
    run = make_run(
        tmp_path, app_images["bigout"], ["1024"], output_limit_bytes=5 * MB, output_mounted=True
    )
    outcome = docker_runner.run(run)
    # Then it met a full disk at the limit: never more on the host, flagged as over
    used = os.statvfs(mounted_output)
    assert (used.f_blocks - used.f_bfree) * used.f_frsize <= 5 * MB
    assert (mounted_output / "big.bin").stat().st_size <= 5 * MB
    assert outcome.output_too_large and not outcome.ok
    assert outcome.reason() == "app output exceeded the limit of 5 MB and was stopped"
    assert_gone(docker_client, run.name)


def test_the_app_cannot_write_its_root_filesystem_and_its_tmp_is_bounded(
    docker_runner: DockerRunner, app_images: dict[str, str], tmp_path: Path
) -> None:
    rootfs = docker_runner.run(make_run(tmp_path, app_images["fsprobe"], ["rootfs"]))
    assert rootfs.ok
    for target in ("/probe.txt", "/root/probe.txt", "/app/probe.txt"):
        assert f"could not write {target}" in rootfs.stdout
    tmpfill = docker_runner.run(
        make_run(tmp_path / "t", app_images["fsprobe"], ["tmpfill", "50"], tmp_bytes=2 * MB)
    )
    assert tmpfill.ok and f"/tmp/fill holds {2 * MB} bytes" in tmpfill.stdout


@pytest.mark.parametrize("mounted", [True, False])
def test_a_tree_deeper_than_path_max_is_measured_and_refused_by_the_zip(
    mounted: bool, docker_runner: DockerRunner, app_images: dict[str, str], tmp_path: Path
) -> None:
    # Given an app that makes 40 levels of 200-character folder names (8,000 characters)
    out = tmp_path / "iexec_out"
    out.mkdir()
    if mounted:
        mounts.mount_tmpfs(out, 5 * MB)
    try:
        run = make_run(tmp_path, app_images["deeptree"], ["40", "200"], output_mounted=mounted)
        outcome = docker_runner.run(run)
        # Then its output is measured (by descriptor, no path too long), not over the limit
        assert outcome.ok and "40 levels of 200-character names" in outcome.stdout
        assert (
            dir_size(out) == len("bottom of 40 levels\n") + (out / "computed.json").stat().st_size
        )
        # And the zip refuses it with a reason, rather than a crash of the node
        with pytest.raises(ResultError, match="cannot be zipped: File name too long"):
            results.package(out, tmp_path / "result.zip", max_bytes=5 * MB)
    finally:
        if mounted:
            mounts.unmount(out)


def test_an_output_that_cannot_be_measured_counts_as_over_the_limit(
    docker_runner: DockerRunner,
    app_images: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a measure of the output that fails (a tree that exhausts the node's descriptors)
    def failing(run: AppRun) -> tuple[int, bool]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(runner_mod, "output_size", failing)
    # Then the run counts as over the limit, never as an output of zero bytes
    outcome = docker_runner.run(make_run(tmp_path, app_images["echo"], ["measure me"]))
    assert outcome.output_too_large and not outcome.ok


@pytest.mark.parametrize(("mode", "node_fault"), [("404", False), ("429", True)])
def test_whose_fault_an_image_pull_is(
    mode: str, node_fault: bool, docker_runner: DockerRunner
) -> None:
    registry = Registry(mode)
    try:
        with pytest.raises(AppImageError) as failed:
            docker_runner.ensure_image(registry.image(f"nope-{SESSION}/app"))
    finally:
        registry.close()
    assert failed.value.node_fault is node_fault
    assert any("/manifests/" in r for r in registry.requests)
    assert ("manifest unknown" if mode == "404" else "toomanyrequests") in str(failed.value)
