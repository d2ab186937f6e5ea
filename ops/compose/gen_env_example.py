#!/usr/bin/env python3
"""Write ``.env.example``: every variable of a docker-compose workerpool, documented.

    .venv/bin/python ops/compose/gen_env_example.py > .env.example      # regenerate
    .venv/bin/python ops/compose/gen_env_example.py --check             # in sync? (exit 1 if not)

The settings' descriptions and defaults come from ``pool.settings.SETTINGS`` (the same table
docs/settings.md is made from), so the file cannot drift from the code; what this module adds
is what only a compose deployment knows: its own variables (images, secret files, ports),
example values for a real chain, and which settings docker-compose.yml sets itself.
``tests/test_compose.py`` keeps .env.example in sync with this output, and checks that every
variable the code reads (``code_variables``) appears in it.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pool.settings import SETTINGS  # noqa: E402 - after the path fix above

WIDTH = 92
# the packages whose environment reads count as "variables the code reads"
SOURCE_PACKAGES = ("cli", "devnet", "scheduler", "workers", "api", "orders", "pool", "poco")


@dataclass(frozen=True)
class Var:
    name: str
    value: str
    doc: str


# ---- variables of docker-compose.yml only (the code never reads them) --------------------------
COMPOSE_VARS: list[tuple[str, list[Var]]] = [
    (
        "docker compose",
        [
            Var(
                "COMPOSE_PROJECT_NAME",
                "workerpool",
                "Prefix of the containers, volumes and network (read by docker compose itself).",
            ),
            Var(
                "COMPOSE_PROFILES",
                "",
                "'monitoring' also starts Flower, Prometheus and Grafana, 'mongo-ui' a MongoDB "
                "web console; both: monitoring,mongo-ui (docker compose reads it; same as "
                "--profile).",
            ),
            Var(
                "WORKERPOOL_IMAGE",
                "workerpool:latest",
                "Tag of the image `docker compose build` makes from ./Dockerfile and the "
                "scheduler, worker and api run. Tag each release (workerpool:0.2.0 ...) to be "
                "able to roll back (docs/deploy.md, Upgrade).",
            ),
            Var("MONGO_IMAGE", "mongo:7.0.39-jammy", "MongoDB image (pinned: upgrade on purpose)."),
            Var("REDIS_IMAGE", "redis:7.4.11-bookworm", "Redis image (pinned)."),
            Var("IPFS_IMAGE", "ipfs/kubo:v0.32.1", "IPFS (Kubo) image (pinned)."),
        ],
    ),
    (
        "secrets (files on this host, mounted read-only under /run/secrets/; never in an image)",
        [
            Var(
                "SCHEDULER_KEYSTORE_FILE",
                "./secrets/scheduler-keystore.json",
                "Encrypted keystore (JSON) of the scheduler wallet, the owner of POOL_ADDRESS. "
                "The scheduler reads it as IEXEC_CORE_WALLET_PATH.",
            ),
            Var(
                "SCHEDULER_KEYSTORE_PASSWORD_FILE",
                "./secrets/scheduler-keystore.password",
                "File holding that keystore's password (IEXEC_CORE_WALLET_PASSWORD_FILE).",
            ),
            Var(
                "WORKER_MNEMONIC_FILE",
                "./secrets/worker-mnemonic",
                "File holding the BIP-39 mnemonic of the worker wallets: each worker replica "
                "leases an index in Redis and signs with the key at m/44'/60'/0'/0/<index> "
                "(IEXEC_WORKER_MNEMONIC_FILE).",
            ),
            Var(
                "REDIS_PASSWORD_FILE",
                "./secrets/redis-password",
                "File holding Redis' password (requirepass), URL-safe: Redis and every service "
                "of the pool read it (WORKERPOOL_REDIS_PASSWORD_FILE). Required.",
            ),
            Var(
                "REDIS_TLS_CERT_FILE",
                "./secrets/redis-tls.crt",
                "Redis' TLS certificate (its names: redis, and the address workers on other "
                "hosts use). Redis speaks TLS only.",
            ),
            Var("REDIS_TLS_KEY_FILE", "./secrets/redis-tls.key", "Its private key."),
            Var(
                "REDIS_CA_FILE",
                "./secrets/redis-ca.crt",
                "The CA certificate that signed it: every client verifies Redis with it "
                "(WORKERPOOL_REDIS_CA_FILE).",
            ),
        ],
    ),
    (
        "host",
        [
            Var(
                "DOCKER_SOCKET",
                "/var/run/docker.sock",
                "The Docker Engine socket of this host: workers run the apps through it.",
            ),
            Var(
                "DOCKER_GID",
                "999",
                "Group id owning that socket (stat -c %g /var/run/docker.sock): the workers' "
                "non-root user joins this group to use it.",
            ),
            Var(
                "API_PUBLISH_ADDRESS",
                "127.0.0.1",
                "Host address the status API is published on (0.0.0.0: every interface; put a "
                "TLS proxy in front).",
            ),
            Var(
                "IPFS_SWARM_PORT",
                "4001",
                "Host port of the IPFS swarm (tcp and udp), so that the network can fetch the "
                "results this node pins. The RPC API (5001) is never published.",
            ),
            Var(
                "IPFS_GATEWAY_PORT",
                "8080",
                "Host port of the IPFS gateway (read-only), on API_PUBLISH_ADDRESS: requesters "
                "download results through it (docs/deploy.md, Requesters).",
            ),
        ],
    ),
    (
        "monitoring (COMPOSE_PROFILES=monitoring); ports are published on 127.0.0.1 only",
        [
            Var("FLOWER_IMAGE", "mher/flower:2.0.1", "Flower (Celery monitor) image (pinned)."),
            Var("FLOWER_PORT", "5555", "Host port of Flower."),
            Var("FLOWER_BASIC_AUTH", "", "user:password for Flower (secret); empty: no login."),
            Var("PROMETHEUS_IMAGE", "prom/prometheus:v2.55.1", "Prometheus image (pinned)."),
            Var("PROMETHEUS_PORT", "9090", "Host port of Prometheus (its alerts page: /alerts)."),
            Var("PROMETHEUS_RETENTION", "30d", "How long Prometheus keeps the pool's metrics."),
            Var("GRAFANA_IMAGE", "grafana/grafana:11.3.0", "Grafana image (pinned)."),
            Var("GRAFANA_PORT", "3000", "Host port of Grafana (the workerpool dashboard)."),
            Var("GRAFANA_ADMIN_USER", "admin", "Grafana administrator."),
            Var(
                "GRAFANA_ADMIN_PASSWORD",
                "",
                "Its password (secret); empty: 'admin', which Grafana asks to change.",
            ),
        ],
    ),
    (
        "MongoDB web console (COMPOSE_PROFILES=mongo-ui); published on 127.0.0.1 only",
        [
            Var(
                "MONGO_UI_IMAGE",
                "mongo-express:1.0.2-20-alpine3.19",
                "mongo-express image (pinned).",
            ),
            Var("MONGO_UI_PORT", "8081", "Host port of the console."),
            Var("MONGO_UI_USER", "admin", "Basic-auth user of the console."),
            Var(
                "MONGO_UI_PASSWORD",
                "",
                "Its password (secret). Required by the mongo-ui profile: the console refuses "
                "to start without one (it can read and change every document of the store).",
            ),
        ],
    ),
]

# ---- settings given another value than the code's default in a compose deployment -------------
EXAMPLE_VALUES: dict[str, tuple[str, str]] = {
    "IEXEC_CHAIN": (
        "arbitrum-mainnet",
        "Shown: Arbitrum One, where iExec runs (token mode: stakes in RLC); "
        "arbitrum-sepolia-testnet to try the pool on iExec's testnet first (docs/deploy.md).",
    ),
    "IEXEC_PRIVATE_CHAIN_ADDRESS": (
        "https://arb1.arbitrum.io/rpc",
        "REQUIRED. Shown: Arbitrum's public node, which limits requests (eth_getLogs above "
        "all): use a node of your own or a provider's. Every service checks that it reports "
        "IEXEC_CHAIN's chain id.",
    ),
    "IEXEC_HUB_ADDRESS": (
        "",
        "Empty: IEXEC_CHAIN's hub (arbitrum-mainnet: 0x098bFCb1E50ebcA0BaA92C12eA0c3F045A1aD9f0).",
    ),
    "POOL_ADDRESS": ("", "REQUIRED: `iexec workerpool deploy` prints it (docs/deploy.md)."),
    "IEXEC_CHAIN_ID": ("", "Empty: IEXEC_CHAIN's id (arbitrum-mainnet: 42161)."),
    "IEXEC_START_BLOCK_NUMBER": (
        "0",
        "Set it to the block of your pool's creation: the first start then reads the chain "
        "from there instead of from block 0.",
    ),
    "MONGO_HOST": ("mongo", "Here: the mongo service."),
    "IEXEC_IPFS_HOST": ("ipfs", "Here: the ipfs service (Kubo)."),
    "WORKERPOOL_REDIS_URL": (
        "rediss://redis:6379/0",
        "Here: the redis service, over TLS, its password and CA from the secrets above. "
        "Workers on other hosts point it at this host's Redis, by a name its certificate "
        "holds (docs/deploy.md).",
    ),
    "IEXEC_WORKER_BASE_DIR": (
        "/var/lib/workerpool/worker",
        "A path on the HOST, mounted at the same path in the workers: apps run as sibling "
        "containers whose bind mounts name host paths (docs/deploy.md).",
    ),
    "WORKERPOOL_ORDERBOOK_URL": (
        "http://api:18090",
        "Here: the api service (its orderbook), for `docker compose run --rm scheduler order …`. "
        "To sell on the iExec marketplace, give `--orderbook` its URL (docs/deploy.md).",
    ),
    "IEXEC_CORE_PORT": (
        "18090",
        "Here: the host port the API is published on (on API_PUBLISH_ADDRESS); inside the "
        "compose network it listens on 18090.",
    ),
}

# ---- settings docker-compose.yml sets itself (an .env value would be ignored) --------------------
SET_BY_COMPOSE: dict[str, str] = {
    "IEXEC_CORE_WALLET_PATH": "/run/secrets/scheduler_keystore (from SCHEDULER_KEYSTORE_FILE)",
    "IEXEC_CORE_WALLET_PASSWORD_FILE": (
        "/run/secrets/scheduler_keystore_password (from SCHEDULER_KEYSTORE_PASSWORD_FILE)"
    ),
    "IEXEC_WORKER_MNEMONIC_FILE": "/run/secrets/worker_mnemonic (from WORKER_MNEMONIC_FILE)",
    "WORKERPOOL_REDIS_PASSWORD_FILE": "/run/secrets/redis_password (from REDIS_PASSWORD_FILE)",
    "WORKERPOOL_REDIS_CA_FILE": "/run/secrets/redis_ca (from REDIS_CA_FILE)",
    "WORKERPOOL_API_HOST": "0.0.0.0 in the api container (published on API_PUBLISH_ADDRESS)",
    "WORKERPOOL_LOCAL_RESULTS_DIR": (
        "/var/lib/workerpool/results, the `results` volume of the workers and the API"
    ),
}

# ---- read by the code, not used by this deployment, and why ----------------------------------
NOT_IN_COMPOSE: dict[str, str] = {
    "IEXEC_CORE_WALLET_PASSWORD": (
        "the keystore password as a variable: compose passes it as a file instead"
    ),
    "IEXEC_WORKER_MNEMONIC": "the mnemonic as a variable: compose passes it as a file instead",
    "IEXEC_WORKER_WALLET_PATH": (
        "a worker keystore is one address; scaled workers use the mnemonic"
    ),
    "IEXEC_WORKER_WALLET_PASSWORD": "(same: worker keystores are not used here)",
    "IEXEC_WORKER_WALLET_PASSWORD_FILE": "(same: worker keystores are not used here)",
    "IEXEC_CORE_WALLET_PRIVATE_KEY": "raw keys: local devnet only",
    "IEXEC_WORKER_WALLET_PRIVATE_KEY": "raw keys: local devnet only",
    "WORKERPOOL_DEVNET": "allows raw keys: local devnet only",
    "WORKERPOOL_FAULT_INJECT": "testing only: makes a worker lie",
    "WORKERPOOL_TOOLS_DIR": "where `workerpool devnet` caches anvil and PoCo (development)",
    "XDG_CACHE_HOME": "the same cache's parent folder (development)",
}

GROUP_TITLES = {
    "core": "chain",
    "scheduler": "scheduler",
    "worker": "worker nodes",
    "results": "results",
    "storage": "storage and broker",
    "api": "status API",
}

HEADER = """\
# .env.example: the settings of a docker-compose workerpool. Copy it to .env (chmod 600),
# fill in the REQUIRED values and the secret files, then follow docs/deploy.md.
#
# Every variable the code reads is here (as a line to set, or in the two lists at the end),
# with the description from pool/settings.py; docs/settings.md is the reference. An empty
# value means the code's default. Secrets go in files under ./secrets/ (mounted as Docker
# secrets) or, for the few secrets that are variables, here in .env: never in an image.
#
# Generated by ops/compose/gen_env_example.py (tests/test_compose.py keeps it in sync):
#   .venv/bin/python ops/compose/gen_env_example.py > .env.example
"""


def _comment(text: str) -> list[str]:
    return textwrap.wrap(
        text, WIDTH - 2, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
    )


def _section(title: str) -> list[str]:
    bar = "# ==== " + title + " "
    return ["", bar + "=" * max(4, WIDTH - len(bar))]


def _listed(name: str, text: str) -> list[str]:
    return textwrap.wrap(
        f"{name}: {text}",
        WIDTH - 4,
        initial_indent="#   ",
        subsequent_indent="#       ",
        break_on_hyphens=False,
    )


def _var_lines(var: Var) -> list[str]:
    return [*_comment(var.doc), f"{var.name}={var.value}", ""]


# files that never run in a pool's process: their environment is not the pool's settings
NOT_POOL_PROCESSES = {
    # the simulated TEE stages run inside their own containers and read their TEE session
    "devnet/tee_stages.py",
}


def code_variables(root: Path = ROOT) -> dict[str, str]:
    """Every environment variable the code reads -> where: the settings table plus any
    ``os.environ[...]``, ``os.environ.get(...)``, ``os.getenv(...)`` under the packages."""
    found = {spec.env: "pool/settings.py (SETTINGS)" for spec in SETTINGS.values()}
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if str(path.relative_to(root)) in NOT_POOL_PROCESSES:
                continue
            for name in environ_reads(path.read_text()):
                found.setdefault(name, str(path.relative_to(root)))
    return found


def environ_reads(source: str) -> set[str]:
    """Names read with a literal key from ``os.environ`` / ``environ`` / ``os.getenv``."""
    names: set[str] = set()

    def is_environ(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
            isinstance(node, ast.Name) and node.id == "environ"
        )

    def literal(node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return None

    for node in ast.walk(ast.parse(source)):
        key: str | None = None
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            # a read, or a write (os.environ["X"] = ...): both mean the variable matters
            key = literal(node.slice)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            if (
                (
                    isinstance(func, ast.Attribute)
                    and func.attr in ("get", "pop", "setdefault")
                    and is_environ(func.value)
                )
                or (isinstance(func, ast.Attribute) and func.attr == "getenv")
                or (isinstance(func, ast.Name) and func.id == "getenv")
            ):
                key = literal(node.args[0])
        if key:
            names.add(key)
    return names


def generate() -> str:
    variables = code_variables()
    known = set(SETTINGS_ENVS()) | set(NOT_IN_COMPOSE) | set(SET_BY_COMPOSE)
    strays = sorted(set(variables) - known)
    if strays:
        where = ", ".join(f"{name} ({variables[name]})" for name in strays)
        raise SystemExit(
            f"read by the code but neither a setting nor listed here: {where}. Declare it in "
            "pool/settings.py, or add it to NOT_IN_COMPOSE in ops/compose/gen_env_example.py."
        )
    lines = HEADER.rstrip("\n").split("\n")
    for title, compose_vars in COMPOSE_VARS:
        lines += _section(title)
        for var in compose_vars:
            lines += _var_lines(var)
    groups: dict[str, list[Var]] = {}
    for spec in SETTINGS.values():
        if spec.env in SET_BY_COMPOSE or spec.env in NOT_IN_COMPOSE:
            continue
        value, note = EXAMPLE_VALUES.get(spec.env, (spec.default or "", ""))
        doc = spec.doc
        if spec.secret:
            doc += " (secret)"
        if value != (spec.default or "") and spec.default:
            doc += f" Code default: {spec.default}."
        if note:
            doc += " " + note
        elif spec.default is None:
            doc += " REQUIRED."
        groups.setdefault(spec.group, []).append(Var(spec.env, value, doc))
    for group, group_vars in groups.items():
        lines += _section("settings: " + GROUP_TITLES.get(group, group))
        for var in group_vars:
            lines += _var_lines(var)
    lines += _section("set by docker-compose.yml in the containers (a value here is ignored)")
    for name, where in SET_BY_COMPOSE.items():
        lines += _listed(name, where)
    lines += _section("read by the code, not used in this deployment")
    for name, why in NOT_IN_COMPOSE.items():
        lines += _listed(name, why)
    return "\n".join(line.rstrip() for line in lines).rstrip("\n") + "\n"


def SETTINGS_ENVS() -> list[str]:
    return [spec.env for spec in SETTINGS.values()]


def compose_variables() -> list[Var]:
    return [var for _, section in COMPOSE_VARS for var in section]


def main(argv: list[str]) -> int:
    text = generate()
    if argv == ["--check"]:
        current = (ROOT / ".env.example").read_text() if (ROOT / ".env.example").exists() else ""
        if current != text:
            print(
                ".env.example is out of date: .venv/bin/python ops/compose/gen_env_example.py "
                "> .env.example",
                file=sys.stderr,
            )
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
