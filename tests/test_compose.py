"""The docker-compose deployment: .env.example, docker-compose.yml, the image, monitoring.

Given the files an operator deploys with, these tests check that
* .env.example holds every variable the code reads (the settings table plus any other
  environment read under the packages) and only variables something reads, in sync with its
  generator, and that docker-compose.yml hands each setting to the services;
* `docker compose config` (v2, where installed) and `docker-compose config` (v1.29, Debian's)
  accept the file with .env.example, and the resolved services have the shape the issue asks
  for (healthchecks, conditions, restart policies, profiles, socket, ports);
* the Redis command and healthcheck, the services' healthcheck script and the work-directory
  preparation do what they claim, against a real redis-server and Docker engine;
* Prometheus' config and alerts are valid and the alerts' unit tests pass (promtool), and the
  Grafana dashboard reads only the metrics docs/deploy.md lists;
* the image builds (from a base made locally: no registry is reachable here) and runs as a
  non-root user.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import require_service
from tls_support import make_certs

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
OPS = ROOT / "ops" / "compose"

CORE_SERVICES = {"mongo", "redis", "ipfs", "scheduler", "prepare", "worker", "api"}
MONITORING_SERVICES = {"flower", "prometheus", "grafana"}
APP_SERVICES = ("scheduler", "worker", "api")
ONE_SHOT = {"prepare"}
# variables docker compose itself reads from .env
COMPOSE_OWN = {"COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES"}
IMAGE_TAG = "workerpool:compose-test"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gen = _load("wp_gen_env_example", OPS / "gen_env_example.py")
healthcheck = _load("wp_healthcheck", OPS / "healthcheck.py")
prepare = _load("wp_prepare", OPS / "prepare.py")


# ---- helpers -----------------------------------------------------------------------------------
def load_yaml(text: str) -> Any:
    """YAML -> Python. PyYAML is not a dependency of the project: fall back on the system
    python3, which has it wherever Debian's docker-compose is installed (ops/test does)."""
    try:
        import yaml
    except ImportError:
        system_python = shutil.which("python3", path="/usr/bin:/bin") or "python3"
        out = subprocess.run(
            [
                system_python,
                "-c",
                "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
            ],
            input=text,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)
    return yaml.safe_load(text)


def env_file_assignments(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def env_file_listed(text: str) -> set[str]:
    """Variables named in the two comment lists at the end ('#   NAME: why')."""
    return set(re.findall(r"^#   ([A-Z_][A-Z0-9_]*): ", text, flags=re.M))


INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def compose_interpolations(text: str) -> dict[str, set[str]]:
    """Variable -> the defaults given to it (``${VAR:-default}``) in the compose file."""
    found: dict[str, set[str]] = {}
    for match in INTERPOLATION.finditer(text):
        defaults = found.setdefault(match.group(1), set())
        if match.group(2) in (":-", "-"):
            defaults.add(match.group(3))
    return found


def compose_tools() -> list[list[str]]:
    tools = []
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        tools.append([docker, "compose"])
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    return tools


def compose_config(tool: list[str], env_file: Path, *extra: str) -> dict[str, Any]:
    result = subprocess.run(
        [*tool, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *extra, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{' '.join(tool)} config failed:\n{result.stderr}"
    config: dict[str, Any] = load_yaml(result.stdout)
    return config


def ports(service: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(host_ip, published, target, protocol) of each port, from v1 strings or v2 mappings."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append(
                (
                    port.get("host_ip", ""),
                    str(port.get("published", "")),
                    str(port["target"]),
                    port.get("protocol", "tcp"),
                )
            )
            continue
        spec, _, protocol = str(port).partition("/")
        parts = spec.split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        published = parts[-2] if len(parts) >= 2 else ""
        out.append((host_ip, published, parts[-1], protocol or "tcp"))
    return out


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, from v1 strings or v2 mappings."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            parts = str(volume).split(":")
            out.append((parts[0], parts[1]))
    return out


def secrets_of(service: dict[str, Any]) -> set[str]:
    """The names of the secrets a service mounts (v1 mappings or v2 strings)."""
    return {
        str(secret["source"] if isinstance(secret, dict) else secret)
        for secret in service.get("secrets", [])
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """docker-compose.yml resolved with .env.example by the first compose tool installed."""
    tools = compose_tools()
    if not tools:
        require_service(
            "docker compose",
            "neither `docker compose` (v2) nor `docker-compose` (v1) is installed "
            "(ops/test installs Debian's docker-compose)",
        )
    return compose_config(tools[0], ENV_EXAMPLE)


# ---- .env.example --------------------------------------------------------------------------------
def test_env_example_is_generated_from_the_settings_table() -> None:
    # When this fails after a setting was added or changed in pool/settings.py:
    #   .venv/bin/python ops/compose/gen_env_example.py > .env.example
    assert ENV_EXAMPLE.read_text() == gen.generate(), ".env.example is out of date (see above)"


def test_every_variable_the_code_reads_is_in_env_example() -> None:
    text = ENV_EXAMPLE.read_text()
    documented = set(env_file_assignments(text)) | env_file_listed(text)
    code = gen.code_variables()
    missing = {name: where for name, where in code.items() if name not in documented}
    assert not missing, f"read by the code but not in .env.example: {missing}"
    # the scan finds reads outside the settings table (devnet/network.py reads two)
    assert {"WORKERPOOL_TOOLS_DIR", "XDG_CACHE_HOME"} <= set(code)


def test_every_variable_in_env_example_is_read() -> None:
    text = ENV_EXAMPLE.read_text()
    assigned = set(env_file_assignments(text))
    listed = env_file_listed(text)
    code = set(gen.code_variables())
    compose = set(compose_interpolations(COMPOSE_FILE.read_text()))
    unread = assigned - code - compose - COMPOSE_OWN
    assert not unread, f"in .env.example but read by nothing: {sorted(unread)}"
    assert not listed - code, f"listed as read by the code but it is not: {sorted(listed - code)}"


def test_compose_hands_every_setting_of_env_example_to_the_services() -> None:
    text = ENV_EXAMPLE.read_text()
    assigned = env_file_assignments(text)
    compose_text = COMPOSE_FILE.read_text()
    interpolated = compose_interpolations(compose_text)
    code = set(gen.code_variables())
    # every setting an operator sets in .env reaches the containers
    not_passed = sorted(name for name in assigned if name in code and name not in interpolated)
    assert not not_passed, (
        f"set in .env.example but docker-compose.yml never uses them: {not_passed} "
        "(add `NAME: ${NAME:-}` to x-settings in docker-compose.yml)"
    )
    # every variable the compose file uses is documented in .env.example
    undocumented = sorted(set(interpolated) - set(assigned))
    assert not undocumented, f"docker-compose.yml uses variables .env.example lacks: {undocumented}"
    # a default in the compose file agrees with the value .env.example shows
    for name, defaults in interpolated.items():
        for default in defaults:
            if default and assigned.get(name):
                assert assigned[name] == default, (
                    f"{name}: .env.example says {assigned[name]!r}, docker-compose.yml "
                    f"defaults to {default!r}"
                )
    # what compose sets itself is set in some service
    for name in gen.SET_BY_COMPOSE:
        assert re.search(rf"^\s+{name}: ", compose_text, flags=re.M), f"{name} not set"


def test_environ_reads_are_found_in_every_form() -> None:
    source = """
import os
from os import environ, getenv
a = os.environ["A_VAR"]
b = os.environ.get("B_VAR", "x")
c = os.getenv("C_VAR")
d = environ.get("D_VAR")
e = getenv("E_VAR")
os.environ["F_VAR"] = "1"
g = {**os.environ, "NOT_A_READ": "1"}
h = os.environ.get(name)
"""
    assert gen.environ_reads(source) == {"A_VAR", "B_VAR", "C_VAR", "D_VAR", "E_VAR", "F_VAR"}


def test_settings_of_every_service_parse(resolved: dict[str, Any]) -> None:
    from pool.settings import Settings

    for name in APP_SERVICES:
        environment = {k: str(v) for k, v in resolved["services"][name]["environment"].items()}
        settings = Settings.from_env(environment)  # raises SettingsError naming a bad value
        assert settings.mongo_host == "mongo" and settings.ipfs_host == "ipfs"
        # Redis over TLS, its password and CA from secrets the service mounts
        assert settings.redis_url == "rediss://redis:6379/0"
        assert settings.redis_password_file == "/run/secrets/redis_password"
        assert settings.redis_ca_file == "/run/secrets/redis_ca"
        assert {"redis_password", "redis_ca"} <= secrets_of(resolved["services"][name])
        assert settings.chain == "arbitrum-mainnet" and settings.chain_id == 42161
        assert settings.hub_address == "0x098bFCb1E50ebcA0BaA92C12eA0c3F045A1aD9f0"
        assert settings.worker_dir == "/var/lib/workerpool/worker"


# ---- docker-compose.yml -------------------------------------------------------------------------
def test_compose_config_validates_with_env_example() -> None:
    tools = compose_tools()
    if not tools:
        require_service("docker compose", "no compose tool installed (ops/test installs one)")
    for tool in tools:  # every compose implementation present must accept the file
        config = compose_config(tool, ENV_EXAMPLE)
        assert set(config["services"]) == CORE_SERVICES | MONITORING_SERVICES, tool


def test_services_have_healthchecks_conditions_and_restart_policies(
    resolved: dict[str, Any],
) -> None:
    services = resolved["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") in (None, "no"), name
            continue
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in MONITORING_SERVICES:
        assert services[name].get("profiles") == ["monitoring"], name
    for name in CORE_SERVICES:
        assert not services[name].get("profiles"), name

    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert conditions("scheduler") == {"mongo": "service_healthy", "redis": "service_healthy"}
    assert conditions("api") == {"mongo": "service_healthy", "redis": "service_healthy"}
    assert conditions("worker") == {
        "prepare": "service_completed_successfully",
        "redis": "service_healthy",
        "ipfs": "service_healthy",
        "scheduler": "service_started",
    }
    # one image, built once from ./Dockerfile, runs the three services
    images = {services[name]["image"] for name in (*APP_SERVICES, "prepare")}
    assert images == {"workerpool:latest"}
    for name in APP_SERVICES:
        assert Path(services[name]["build"]["context"]).resolve() == ROOT
    assert services["scheduler"]["command"] == ["-v", "scheduler"]
    assert services["worker"]["command"] == ["-v", "worker"]
    assert services["api"]["command"] == ["-v", "api"]


def test_storage_broker_and_ipfs(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert ("mongo-data", "/data/db") in mounts(services["mongo"])
    assert ("redis-data", "/data") in mounts(services["redis"])
    assert "--appendonly yes" in " ".join(services["redis"]["command"])
    assert ("ipfs-data", "/data/ipfs") in mounts(services["ipfs"])
    # the Kubo RPC API is for the compose network only; mongo and redis are not published
    assert all(target != "5001" for _, _, target, _ in ports(services["ipfs"]))
    assert not ports(services["mongo"]) and not ports(services["redis"])


def test_worker_uses_the_host_docker_socket_and_same_path_work_dir(
    resolved: dict[str, Any],
) -> None:
    worker = resolved["services"]["worker"]
    volumes = mounts(worker)
    assert ("/var/run/docker.sock", "/var/run/docker.sock") in volumes
    base = worker["environment"]["IEXEC_WORKER_BASE_DIR"]
    assert (base, base) in volumes, "the work dir must have the same path inside and outside"
    assert [str(g) for g in worker["group_add"]] == ["999"]  # DOCKER_GID of .env.example
    assert "user" not in worker  # the image's non-root user
    # scalable: nothing that names one container
    assert not ports(worker) and "container_name" not in worker
    assert worker["environment"]["IEXEC_WORKER_MNEMONIC_FILE"] == "/run/secrets/worker_mnemonic"
    prepare_service = resolved["services"]["prepare"]
    assert (base, base) in mounts(prepare_service)
    assert str(prepare_service["user"]) == "0:0"


def test_api_port_comes_from_iexec_core_port(resolved: dict[str, Any], tmp_path: Path) -> None:
    api = resolved["services"]["api"]
    assert ports(api) == [("127.0.0.1", "18090", "18090", "tcp")]
    assert api["environment"]["WORKERPOOL_API_HOST"] == "0.0.0.0"
    env = tmp_path / "env"
    env.write_text(
        ENV_EXAMPLE.read_text()
        .replace("IEXEC_CORE_PORT=18090", "IEXEC_CORE_PORT=28090")
        .replace("API_PUBLISH_ADDRESS=127.0.0.1", "API_PUBLISH_ADDRESS=0.0.0.0")
    )
    changed = compose_config(compose_tools()[0], env)["services"]["api"]
    assert [(p[1], p[2]) for p in ports(changed)] == [("28090", "18090")]
    assert ports(changed)[0][0] in ("0.0.0.0", "")


def test_secrets_come_from_files_and_never_from_the_image(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    scheduler = services["scheduler"]["environment"]
    assert scheduler["IEXEC_CORE_WALLET_PATH"] == "/run/secrets/scheduler_keystore"
    assert (
        scheduler["IEXEC_CORE_WALLET_PASSWORD_FILE"] == "/run/secrets/scheduler_keystore_password"
    )
    for name in APP_SERVICES:
        env = services[name]["environment"]
        for secret in (
            "IEXEC_CORE_WALLET_PASSWORD",
            "IEXEC_WORKER_MNEMONIC",
            "IEXEC_CORE_WALLET_PRIVATE_KEY",
            "IEXEC_WORKER_WALLET_PRIVATE_KEY",
        ):
            assert secret not in env, f"{name} gets {secret} in its environment"
    secret_files = {name: Path(spec["file"]) for name, spec in resolved["secrets"].items()}
    assert set(secret_files) == {
        "scheduler_keystore",
        "scheduler_keystore_password",
        "worker_mnemonic",
        "redis_password",
        "redis_tls_cert",
        "redis_tls_key",
        "redis_ca",
    }
    # Redis' certificate and key for Redis only; its password and CA for its clients
    assert secrets_of(services["redis"]) == {
        "redis_password",
        "redis_tls_cert",
        "redis_tls_key",
        "redis_ca",
    }
    for name in (*APP_SERVICES, "flower"):
        assert secrets_of(services[name]) & {"redis_tls_key", "redis_tls_cert"} == set(), name
        assert {"redis_password", "redis_ca"} <= secrets_of(services[name]), name
        assert "REDIS_PASSWORD" not in services[name].get("environment", {}), name
    assert "rediss://" in " ".join(services["flower"]["command"])
    for path in secret_files.values():
        assert path.resolve().parent == ROOT / "secrets"
    # .dockerignore keeps .env and ./secrets out of every build context
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"*", "**/.env", "**/secrets"} <= set(ignore)


def test_redis_command_and_healthcheck_need_tls_and_the_password(
    resolved: dict[str, Any], tmp_path: Path
) -> None:
    """Run the compose file's own Redis command and healthcheck (after compose's `$$`
    unescaping, the secrets' paths pointed at files made here) against a real redis-server
    on a free port: it speaks TLS only, wants the password, refuses to start without one."""
    if not shutil.which("redis-server"):
        require_service("redis-server", "not installed (ops/test installs it)")
    redis = resolved["services"]["redis"]
    # (the image's entrypoint, which drops to the user redis, is not on this host)
    command = redis["command"][2].replace("$$", "$").replace("docker-entrypoint.sh ", "")
    assert "exec redis-server " in command and "--port 0 --tls-port 6379" in command
    check = redis["healthcheck"]["test"][1].replace("$$", "$")
    ca, cert, key = make_certs(tmp_path / "tls")
    password = tmp_path / "redis_password"
    files = {
        "/run/secrets/redis_tls_cert": cert,
        "/run/secrets/redis_tls_key": key,
        "/run/secrets/redis_ca": ca,
        "/run/secrets/redis_password": password,
    }

    def here(text: str, **other: Path) -> str:
        for secret, path in {**files, **{f"/run/secrets/{k}": v for k, v in other.items()}}.items():
            text = text.replace(secret, str(path))
        return text

    port = free_port()
    server_cmd = here(command) + f" --tls-port {port} --bind 127.0.0.1 --dir {tmp_path} --save ''"
    # an empty password file: Redis does not start, and says which secret is missing
    password.write_text("")
    refused = run(["sh", "-c", server_cmd], timeout=30)
    assert refused.returncode != 0 and "REDIS_PASSWORD_FILE" in refused.stderr
    password.write_text("6f1c0ffee0ddba11")
    server = subprocess.Popen(
        ["sh", "-c", server_cmd + " --daemonize no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe_cmd = here(check).replace("redis-cli", f"redis-cli -p {port}")
    try:
        deadline = time.monotonic() + 10
        while True:
            probe = run(["sh", "-c", probe_cmd])
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, f"healthcheck never passed: {probe.stderr}"
            time.sleep(0.1)
        appendonly = run(
            ["sh", "-c", probe_cmd.replace("ping | grep -q PONG", "config get appendonly")]
        )
        assert "yes" in appendonly.stdout
        # a wrong password, or no TLS: no answer
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-password")
        probe = run(["sh", "-c", here(check, redis_password=wrong).replace(
            "redis-cli", f"redis-cli -p {port}"
        )])  # fmt: skip
        assert probe.returncode != 0
        plain = run(["redis-cli", "-p", str(port), "-a", password.read_text(), "ping"])
        assert "PONG" not in plain.stdout
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---- the services' healthcheck script and the work-dir preparation -------------------------------
def test_healthcheck_pings_only_this_containers_celery_nodes(redis_url: str) -> None:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    # a host name of its own: other tests' Celery nodes on this machine share the broker
    host = f"healthcheck-test-{os.getpid()}"
    app = Celery("healthcheck-test", broker=redis_url, backend=redis_url)
    app.conf.worker_hijack_root_logger = False
    with start_worker(
        app,
        pool="threads",
        concurrency=1,
        perform_ping_check=False,
        hostname=f"scheduler@{host}",
        shutdown_timeout=10,
    ):
        answered: set[str] = set()
        for _ in range(20):  # the node's control consumer starts just after the worker
            answered = healthcheck.ping_nodes(redis_url, host, timeout=1.0)
            if answered:
                break
        assert f"scheduler@{host}" in answered
        assert healthcheck.missing_nodes("scheduler", answered, host) == []
        assert healthcheck.missing_nodes("worker", answered, host) == ["worker-", "control-"]
        # a node of another host does not make this one healthy
        assert healthcheck.missing_nodes("scheduler", answered, "elsewhere") == ["scheduler@"]
        assert healthcheck.ping_nodes(redis_url, "no-such-host", timeout=0.5) == set()
    assert (
        healthcheck.missing_nodes("worker", {f"worker-0xabc@{host}", f"control-0xabc@{host}"}, host)
        == []
    )


def test_healthcheck_of_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("IEXEC_CORE_PORT", str(server.server_address[1]))
        assert healthcheck.check_api()[0] is True
        assert healthcheck.main(["api"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.check_api(timeout=1)[0] is False
    assert healthcheck.main(["nonsense"]) == 2


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        require_service(
            "root", "the work-dir preparation chowns to uid 10001 (ops/test runs as root)"
        )


@pytest.mark.docker
def test_prepared_work_dir_lets_a_root_app_write_and_the_worker_clean_up(
    as_root: None, docker_client: Any, app_images: dict[str, str]
) -> None:
    """Given the prepared base dir, when the worker's user (uid 10001, umask 022) makes a task's
    output folder and an app runs as root with every capability dropped (as workers/runner.py
    runs apps), then the app can write there and the worker can delete what it wrote."""
    # (pytest's tmp_path sits in a 0700 folder of root that uid 10001 cannot cross)
    top = Path(tempfile.mkdtemp(prefix="workerpool-prepare-"))
    top.chmod(0o755)
    try:
        _root_app_writes_and_worker_cleans(top / "worker", docker_client, app_images["echo"])
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _root_app_writes_and_worker_cleans(base: Path, docker_client: Any, image: str) -> None:
    try:
        prepare.prepare_work_dir(base)
    except OSError as exc:
        pytest.fail(f"this file system refuses a default ACL: {exc}")
    assert base.stat().st_uid == 10001 and base.stat().st_mode & 0o777 == 0o700
    out = base / "0xworker" / "0xtask" / "iexec_out"
    plain = base.parent / "plain" / "iexec_out"  # the control: no default ACL above it
    as_worker = ["setpriv", "--reuid", "10001", "--regid", "10001", "--clear-groups"]
    plain.parent.mkdir()
    os.chown(plain.parent, 10001, 10001)
    made = run([*as_worker, "sh", "-c", f"umask 022 && mkdir -p {out} {plain}"])
    assert made.returncode == 0, made.stderr
    script = "mkdir /iexec_out/sub && echo r > /iexec_out/sub/f && echo ok > /iexec_out/result.txt"

    def app(folder: Path) -> int:
        container = docker_client.containers.run(
            image,
            ["sh", "-c", script],
            entrypoint=[],
            detach=True,
            network_mode="none",
            volumes={str(folder): {"bind": "/iexec_out", "mode": "rw"}},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
        )
        try:
            return int(container.wait(timeout=60)["StatusCode"])
        finally:
            container.remove(force=True)

    assert app(plain) != 0, "without the ACL a root app without capabilities cannot write"
    assert app(out) == 0
    assert (out / "result.txt").read_text() == "ok\n"
    cleaned = run([*as_worker, "rm", "-rf", str(base / "0xworker")])
    assert cleaned.returncode == 0, cleaned.stderr
    assert list(base.iterdir()) == []


def test_prepare_refuses_a_relative_base_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IEXEC_WORKER_BASE_DIR", "relative/dir")
    assert prepare.main() == 2


# ---- monitoring --------------------------------------------------------------------------------
def documented_metrics() -> set[str]:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    return set(re.findall(r"^\| `(workerpool_[a-z0-9_]+)` \|", doc, flags=re.M))


def metrics_in(text: str) -> set[str]:
    return set(re.findall(r"\b(workerpool_[a-z0-9_]+)\b", text))


def test_prometheus_config_and_alerts_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if not promtool:
        require_service("promtool", "not installed (ops/test installs Debian's prometheus)")
    checked = run([promtool, "check", "config", str(OPS / "prometheus.yml")])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run([promtool, "test", "rules", str(OPS / "alerts.test.yml")], cwd=OPS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = load_yaml((OPS / "prometheus.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert "api:18090" in targets


def test_dashboard_and_alerts_read_only_documented_metrics() -> None:
    dashboard_text = (OPS / "grafana" / "dashboards" / "workerpool.json").read_text()
    dashboard = json.loads(dashboard_text)
    assert dashboard["uid"] == "workerpool" and dashboard["panels"]
    datasource = load_yaml((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid
            exprs.append(target["expr"])
    alerts = (OPS / "alerts.yml").read_text()
    used = metrics_in("\n".join(exprs)) | metrics_in(alerts)
    documented = documented_metrics()
    assert used, "the dashboard reads no metric of the pool"
    assert used <= documented, f"not listed in docs/deploy.md: {sorted(used - documented)}"
    assert documented <= used, f"listed but shown nowhere: {sorted(documented - used)}"
    provider = load_yaml((OPS / "grafana/provisioning/dashboards/workerpool.yml").read_text())
    compose = COMPOSE_FILE.read_text()
    assert (
        f"./ops/compose/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro"
        in compose
    )


# ---- the image ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_image() -> Iterator[str]:
    """The project image, built from a base made here (no image registry is reachable):
    ops/compose/make-base-image (debootstrap, ~50 s the first time, then reused) and
    `docker build --network host` (pip needs the package index; ~45 s cold, seconds warm)."""
    if not shutil.which("docker") or run(["docker", "info"]).returncode != 0:
        require_service("docker", "no Docker engine answers")
    if not shutil.which("debootstrap"):
        require_service("debootstrap", "not installed (ops/test installs it)")
    t0 = time.monotonic()
    made = run(["bash", str(OPS / "make-base-image")], timeout=600)
    assert made.returncode == 0, made.stderr
    base = made.stdout.strip().splitlines()[-1]
    t1 = time.monotonic()
    build = run(
        [
            "docker",
            "build",
            "--network",
            "host",
            "--build-arg",
            f"BASE_IMAGE={base}",
            "-t",
            IMAGE_TAG,
            ".",
        ],
        cwd=ROOT,
        timeout=900,
    )
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    print(f"image: base {t1 - t0:.0f}s, build {time.monotonic() - t1:.0f}s")
    yield IMAGE_TAG


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_image_runs_the_cli_as_a_non_root_user(
    built_image: str, resolved: dict[str, Any], tmp_path: Path
) -> None:
    docker = ["docker", "run", "--rm", "--network", "none"]
    uid = run([*docker, "--entrypoint", "id", built_image, "-u"])
    assert uid.stdout.strip() == "10001", uid.stderr
    usage = run([*docker, built_image, "--help"])
    assert usage.returncode == 0 and "scheduler" in usage.stdout and "worker" in usage.stdout
    # the scheduler's settings as compose hands them over parse inside the image
    env_file = tmp_path / "scheduler.env"
    env_file.write_text(
        "".join(f"{k}={v}\n" for k, v in resolved["services"]["scheduler"]["environment"].items())
    )
    shown = run([*docker, "--env-file", str(env_file), built_image, "settings"])
    assert shown.returncode == 0, shown.stderr
    assert "mongo_host = 'mongo'" in shown.stdout and "chain_id = 42161" in shown.stdout
    # the healthcheck is installed and says unhealthy when nothing listens
    probe = run([*docker, "--entrypoint", "workerpool-healthcheck", built_image, "api"])
    assert probe.returncode == 1 and "api:" in probe.stdout
    # the image holds no project source tree, tests, .env or secrets: only the venv
    listing = run(
        [
            *docker,
            "--entrypoint",
            "sh",
            built_image,
            "-c",
            "ls -A / /var/lib/workerpool; test ! -e /src && echo no-src",
        ]
    )
    assert "no-src" in listing.stdout and ".env" not in listing.stdout


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_image_prepare_gives_the_work_dir_to_the_worker_user(
    as_root: None, built_image: str, tmp_path: Path
) -> None:
    base = tmp_path / "worker"
    result = run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "--user",
            "0:0",
            "--entrypoint",
            "workerpool-prepare",
            "-e",
            f"IEXEC_WORKER_BASE_DIR={base}",
            "-v",
            f"{tmp_path}:{tmp_path}",
            built_image,
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert base.stat().st_uid == 10001
    assert os.getxattr(base, "system.posix_acl_default") == prepare.open_default_acl()
