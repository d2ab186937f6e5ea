"""The multi-host harness: network namespaces, veth links, shaping, cuts, and the core's
Redis (alone, or a primary, a replica and three Sentinels). See the package docstring."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hosts.proxy import Shape

PROXY = Path(__file__).resolve().with_name("proxy.py")
PROXY_PORT = 15000  # the transparent proxy's port on a worker host's loopback
MARK = 0x5750  # SO_MARK of the proxy's own connections: the redirect rule lets them pass
ROUTE_METRIC = "1000"
DEFAULT_SUBNET = "10.250.0.0/24"
DEFAULT_PREFIX = "wph-"
OWNER_ENV = "WP_HOSTS_OWNER"  # in the environment of every core process the harness starts


class HostsError(RuntimeError):
    """The harness could not build or change the hosts (the message says which command)."""


def netns_available() -> str | None:
    """None when this machine can run the harness, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, nftables)"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    # root is not always enough (a container without CAP_NET_ADMIN, no netns support)
    probe = f"wph-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(cmd: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=30)
    if check and proc.returncode != 0:
        raise HostsError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; the process is reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)


def _kill_pids(pids: Sequence[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)


def _netns_pids(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _pidfile(prefix: str) -> Path:
    return Path(tempfile.gettempdir()) / f"{prefix}hosts.pids"


def _hold(prefix: str) -> socket.socket:
    """One run per prefix at a time: a second one waits here rather than take the first
    one's names for leftovers. The lock is an abstract unix socket name: nothing on disk,
    and it goes with its holder's process, even one killed with -9."""
    waiting = False
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(f"\0workerpool-hosts-{prefix}")
            return sock
        except OSError:
            sock.close()
        if not waiting:
            print(f"hosts: another run uses the prefix {prefix!r}: waiting", flush=True)
            waiting = True
        time.sleep(0.5)


def remove_leftovers(prefix: str, subnet: str) -> list[str]:
    """Remove what a killed run with ``prefix`` left behind: the processes it started on the
    core (listed in its pid file, each checked to be ours by its command line), the
    processes in its namespaces, its namespaces and links, the core's address and the
    blackhole route. Returns what was removed."""
    net = ipaddress.ip_network(subnet)
    core = f"{next(net.hosts())}/32"
    removed: list[str] = []
    pidfile = _pidfile(prefix)
    if pidfile.exists():
        pids = []
        mark = f"{OWNER_ENV}={prefix}".encode()
        for line in pidfile.read_text().split():
            with contextlib.suppress(OSError, ValueError):
                if mark in Path(f"/proc/{int(line)}/environ").read_bytes().split(b"\0"):
                    pids.append(int(line))
        _kill_pids(pids)
        removed += [f"pid {p}" for p in pids]
        pidfile.unlink(missing_ok=True)
    for line in _run(["ip", "netns", "list"], check=False).splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(prefix):
            _kill_pids(_netns_pids(ns))
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(f"netns {ns}")
    for line in _run(["ip", "-o", "link", "show"], check=False).splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith(prefix):
            _run(["ip", "link", "del", name], check=False)
            removed.append(f"link {name}")
    if core.split("/")[0] in _run(["ip", "-o", "addr", "show", "dev", "lo"], check=False):
        _run(["ip", "addr", "del", core, "dev", "lo"], check=False)
        removed.append(f"address {core}")
    route = ["blackhole", str(net), "metric", ROUTE_METRIC]
    if _run(["ip", "route", "show", "type", "blackhole", str(net)], check=False).strip():
        _run(["ip", "route", "del", *route], check=False)
        removed.append(f"route {' '.join(route)}")
    return removed


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, proc: subprocess.Popen[Any], log: Path, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HostsError(f"{what} exited ({proc.returncode}): {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise HostsError(f"{what} does not listen on {host}:{port} after 20 s: {_tail(log)}")


def _tail(log: Path, n: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@dataclass
class RedisServer:
    """A redis-server the harness started on the core's address; a password is required."""

    host: str
    port: int
    password: str
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, db: int = 0) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/{db}"

    def command(self, *args: str, timeout: float = 5) -> str:
        """A redis-cli command against this server (its output)."""
        return _run(
            [
                "timeout",
                str(timeout),
                "redis-cli",
                "--no-auth-warning",
                "-a",
                self.password,
                "-h",
                self.host,
                "-p",
                str(self.port),
                *args,
            ]
        )

    def kill(self) -> None:
        """``kill -9``: the server is gone with whatever it had not handed on."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class SentinelGroup:
    """A primary, a replica and three Sentinels watching them (quorum 2), all on the core."""

    master_name: str
    password: str
    servers: list[RedisServer]
    sentinels: list[tuple[str, int]]
    procs: list[subprocess.Popen[bytes]]

    def url(self, db: int = 0) -> str:
        """The ``sentinel://`` URL (Celery's form: one ``;``-separated part per Sentinel)
        whose password is the Redis servers' one."""
        return ";".join(f"sentinel://:{self.password}@{h}:{p}/{db}" for h, p in self.sentinels)

    def primary(self) -> RedisServer:
        """The server the Sentinels name as the primary now (first Sentinel that answers)."""
        for host, port in self.sentinels:
            with contextlib.suppress(HostsError):
                out = _run(
                    [
                        "timeout",
                        "5",
                        "redis-cli",
                        "--no-auth-warning",
                        "-a",
                        self.password,
                        "-h",
                        host,
                        "-p",
                        str(port),
                        "SENTINEL",
                        "get-master-addr-by-name",
                        self.master_name,
                    ]
                ).split()
                if len(out) == 2:
                    for server in self.servers:
                        if (server.host, server.port) == (out[0], int(out[1])):
                            return server
        raise HostsError(f"no Sentinel names a primary for {self.master_name}")

    def replicas_in_sync(self) -> bool:
        """The primary has a replica connected and caught up with its replication offset."""
        info = self.primary().command("INFO", "replication")
        fields = dict(
            line.split(":", 1) for line in info.splitlines() if ":" in line and "=" not in line
        )
        offset = int(fields.get("master_repl_offset", "-1"))
        for line in info.splitlines():
            if line.startswith("slave") and "state=online" in line:
                parts = dict(p.split("=", 1) for p in line.split(":", 1)[1].split(","))
                if int(parts["offset"]) >= offset:
                    return True
        return False

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the replica is in sync and every Sentinel knows the replica and its peers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(HostsError, ValueError, KeyError):
                if self.replicas_in_sync() and all(
                    self._sentinel_sees(h, p) for h, p in self.sentinels
                ):
                    return
            time.sleep(0.2)
        raise HostsError("the Sentinel group did not settle (replica in sync, sentinels known)")

    def _sentinel_sees(self, host: str, port: int) -> bool:
        out = _run(
            [
                "timeout",
                "5",
                "redis-cli",
                "--no-auth-warning",
                "-a",
                self.password,
                "-h",
                host,
                "-p",
                str(port),
                "SENTINEL",
                "master",
                self.master_name,
            ]
        ).split()
        info = dict(zip(out[::2], out[1::2], strict=False))
        return (
            int(info.get("num-slaves", 0)) >= 1
            and int(info.get("num-other-sentinels", 0)) >= len(self.sentinels) - 1
        )

    def kill_primary(self) -> RedisServer:
        """``kill -9`` the primary; returns it."""
        primary = self.primary()
        primary.kill()
        return primary

    def wait_failover(self, old: RedisServer, timeout: float = 60) -> RedisServer:
        """Until the Sentinels name another primary and it answers as a primary."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(HostsError):
                new = self.primary()
                if new is not old and "role:master" in new.command("INFO", "replication"):
                    return new
            time.sleep(0.2)
        raise HostsError(f"no failover after {timeout} s")


@dataclass
class WorkerHost:
    """A worker host: its own network namespace, one link to the core."""

    hosts: Hosts
    index: int
    name: str  # the namespace
    link: str  # the veth end on the core's side
    ip: str  # this host's address
    core_side: str  # the core's end of the link
    shape: Shape | None = None
    _proxy: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def command(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as run inside this host."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside this host (``subprocess.Popen`` keyword arguments)."""
        return subprocess.Popen(self.command(cmd), **kwargs)

    def run(self, cmd: Sequence[str], *, check: bool = True) -> str:
        return _run(self.command(cmd), check=check)

    def cut(self) -> None:
        """Take the link down: nothing passes either way until :meth:`restore`."""
        _run(["ip", "link", "set", self.link, "down"])

    def restore(self) -> None:
        """Bring the link back up; returns once both ends carry traffic (the kernel applies
        a carrier change up to a second later)."""
        _run(["ip", "link", "set", self.link, "up"])
        peer = self.link[:-1] + "n"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            outside = _run(["ip", "-o", "link", "show", self.link], check=False)
            inside = self.run(["ip", "-o", "link", "show", peer], check=False)
            if "state UP" in outside and "state UP" in inside:
                # an address lookup (ARP) begun while the link was down would still fail
                # the first packets sent after it is up: start afresh
                _run(["ip", "neigh", "flush", "dev", self.link], check=False)
                self.run(["ip", "neigh", "flush", "dev", peer], check=False)
                return
            time.sleep(0.05)
        raise HostsError(f"link {self.link} is not up 10 s after `ip link set up`")

    @property
    def is_cut(self) -> bool:
        return "state DOWN" in _run(["ip", "-o", "link", "show", self.link], check=False)

    def reaches(self, host: str, port: int, timeout: float = 2) -> bool:
        """Does a TCP connection from this host to ``host:port`` open?"""
        code = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        proc = subprocess.run(
            self.command([sys.executable, "-c", code]), capture_output=True, timeout=timeout + 10
        )
        return proc.returncode == 0

    def set_shape(self, shape: Shape | None) -> None:
        """Shape this host's link (None or a no-op shape: a plain link, no proxy)."""
        table = f"{self.hosts.prefix}shape".replace("-", "_")
        if self._proxy is not None:
            _run(self.command(["nft", "delete", "table", "ip", table]), check=False)
            _stop(self._proxy)
            self._proxy = None
        self.shape = shape
        if shape is None or not shape.active:
            return
        log = self.hosts.workdir / f"{self.name}-proxy.log"
        self._proxy = proxy = self.popen(
            [
                sys.executable,
                str(PROXY),
                "--transparent",
                str(PROXY_PORT),
                "--mark",
                hex(MARK),
                "--delay",
                str(shape.delay * 1000),
                "--jitter",
                str(shape.jitter * 1000),
                "--loss",
                str(shape.loss),
            ],
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
        )
        assert proxy.stdout is not None
        if proxy.stdout.readline().strip() != b"ready":
            raise HostsError(f"the link proxy of {self.name} did not start: {_tail(log)}")
        rules = (
            f"table ip {table} {{\n"
            "  chain out {\n"
            "    type nat hook output priority -100; policy accept;\n"
            f"    meta mark != {hex(MARK)} ip daddr {self.hosts.core_ip} meta l4proto tcp"
            f" redirect to :{PROXY_PORT}\n"
            "  }\n"
            "}\n"
        )
        _run(self.command(["nft", "-f", "-"]), input=rules)


class Hosts:
    """The core (this namespace) and ``workers`` worker hosts; a context manager."""

    def __init__(
        self,
        workers: int,
        *,
        shape: Shape | None = None,
        subnet: str | None = None,
        prefix: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.subnet = ipaddress.ip_network(
            subnet or os.environ.get("WP_HOSTS_SUBNET") or DEFAULT_SUBNET
        )
        self.prefix = prefix or os.environ.get("WP_HOSTS_PREFIX") or DEFAULT_PREFIX
        if self.subnet.prefixlen > 24 or self.subnet.version != 4:
            raise HostsError(f"{self.subnet}: an IPv4 subnet of /24 or larger is needed")
        if not 1 <= workers <= 60:
            raise HostsError("1 to 60 worker hosts")
        if len(self.prefix) > 8:
            raise HostsError(f"prefix {self.prefix!r}: 8 characters at most (link names)")
        self.core_ip = str(self.subnet.network_address + 1)
        self.workers: list[WorkerHost] = []
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"{self.prefix}hosts-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._undo: list[list[str]] = []
        self._count = workers
        self._shape = shape
        self._lock: socket.socket | None = None

    # ---- building and tearing down -------------------------------------------------------
    def __enter__(self) -> Hosts:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def open(self) -> None:
        why = netns_available()
        if why:
            raise HostsError(why)
        self._lock = _hold(self.prefix)
        remove_leftovers(self.prefix, str(self.subnet))
        route = ["blackhole", str(self.subnet), "metric", ROUTE_METRIC]
        _run(["ip", "route", "add", *route])
        self._undo.append(["ip", "route", "del", *route])
        _run(["ip", "addr", "add", f"{self.core_ip}/32", "dev", "lo"])
        self._undo.append(["ip", "addr", "del", f"{self.core_ip}/32", "dev", "lo"])
        base = self.subnet.network_address
        for i in range(1, self._count + 1):
            ns, link, peer = f"{self.prefix}w{i}", f"{self.prefix}w{i}h", f"{self.prefix}w{i}n"
            core_side, ip = str(base + 4 * i + 1), str(base + 4 * i + 2)
            _run(["ip", "netns", "add", ns])
            self._undo.append(["ip", "netns", "del", ns])
            _run(["ip", "link", "add", link, "type", "veth", "peer", "name", peer])
            self._undo.append(["ip", "link", "del", link])
            _run(["ip", "link", "set", peer, "netns", ns])
            _run(["ip", "addr", "add", f"{core_side}/30", "dev", link])
            _run(["ip", "link", "set", link, "up"])
            inside = ["ip", "netns", "exec", ns, "ip"]
            _run([*inside, "addr", "add", f"{ip}/30", "dev", peer])
            _run([*inside, "link", "set", peer, "up"])
            _run([*inside, "link", "set", "lo", "up"])
            _run([*inside, "route", "add", f"{self.core_ip}/32", "via", core_side])
            host = WorkerHost(self, i, ns, link, ip, core_side)
            self.workers.append(host)
            host.set_shape(self._shape)

    def close(self) -> None:
        """Undo everything, whatever state it is in (never raises)."""
        for host in self.workers:
            with contextlib.suppress(Exception):
                if host._proxy is not None:
                    _stop(host._proxy)
            with contextlib.suppress(Exception):
                _kill_pids(_netns_pids(host.name))
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                _stop(proc)
        for cmd in reversed(self._undo):
            with contextlib.suppress(Exception):
                _run(cmd, check=False)
        self._undo.clear()
        self._procs.clear()
        _pidfile(self.prefix).unlink(missing_ok=True)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _owned_env(self) -> dict[str, str]:
        """The environment of a core process: marked as ours for :func:`remove_leftovers`."""
        return {**os.environ, OWNER_ENV: self.prefix}

    def _track(self, proc: subprocess.Popen[bytes]) -> None:
        self._procs.append(proc)
        with _pidfile(self.prefix).open("a") as f:
            f.write(f"{proc.pid}\n")

    # ---- the core's services --------------------------------------------------------------
    def publish(self, port: int, target: str = "127.0.0.1") -> int:
        """Relay ``target:port`` (a service listening on loopback only) onto the core's
        address, same port when free; returns the port on the core's address."""
        listen = port
        try:
            with socket.socket() as s:
                s.bind((self.core_ip, port))
        except OSError:
            listen = _free_port(self.core_ip)
        log = self.workdir / f"relay-{port}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                str(PROXY),
                "--relay",
                f"{self.core_ip}:{listen}={target}:{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            env=self._owned_env(),
        )
        self._track(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise HostsError(f"relay of {target}:{port} did not start: {_tail(log)}")
        return listen

    def _redis_proc(self, name: str, args: list[str], port: int) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        exe = shutil.which("redis-server") or "redis-server"
        proc = subprocess.Popen(
            [exe, *args, "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
            env=self._owned_env(),
        )
        self._track(proc)
        _wait_port(self.core_ip, port, proc, log, name)
        return proc

    def start_redis(
        self, password: str | None = None, *, name: str = "redis", extra: Sequence[str] = ()
    ) -> RedisServer:
        """A redis-server on the core's address that requires ``password`` (a random one
        unless given), without persistence."""
        password = password or secrets.token_hex(12)
        port = _free_port(self.core_ip)
        data = self.workdir / name
        data.mkdir(exist_ok=True)
        args = [
            "--bind",
            self.core_ip,
            "--port",
            str(port),
            "--requirepass",
            password,
            "--masterauth",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data),
            "--dbfilename",
            f"{self.prefix}{name}.rdb",
            *extra,
        ]
        proc = self._redis_proc(name, args, port)
        return RedisServer(self.core_ip, port, password, proc, self.workdir / f"{name}.log")

    def start_sentinel_group(
        self,
        password: str | None = None,
        *,
        master_name: str = "workerpool",
        down_after_ms: int = 2000,
    ) -> SentinelGroup:
        """A primary and a replica (both require ``password``) and three Sentinels (which
        require it too) with quorum 2; returns once the group has settled."""
        password = password or secrets.token_hex(12)
        primary = self.start_redis(password, name="redis-primary")
        replica = self.start_redis(
            password,
            name="redis-replica",
            extra=["--replicaof", primary.host, str(primary.port)],
        )
        sentinels: list[tuple[str, int]] = []
        procs = []
        for n in range(1, 4):
            port = _free_port(self.core_ip)
            conf = self.workdir / f"sentinel-{n}.conf"
            conf.write_text(
                f"bind {self.core_ip}\n"
                f"port {port}\n"
                f"dir {self.workdir}\n"
                f"requirepass {password}\n"
                f"sentinel monitor {master_name} {primary.host} {primary.port} 2\n"
                f"sentinel auth-pass {master_name} {password}\n"
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                f"sentinel failover-timeout {master_name} 10000\n"
                f"sentinel parallel-syncs {master_name} 1\n"
            )
            procs.append(self._redis_proc(f"sentinel-{n}", [str(conf), "--sentinel"], port))
            sentinels.append((self.core_ip, port))
        group = SentinelGroup(master_name, password, [primary, replica], sentinels, procs)
        group.wait_ready()
        return group

    # ---- helpers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def cut(self, *hosts: WorkerHost) -> Iterator[None]:
        """Links of ``hosts`` down inside the block, up again after it."""
        for host in hosts:
            host.cut()
        try:
            yield
        finally:
            for host in hosts:
                host.restore()
