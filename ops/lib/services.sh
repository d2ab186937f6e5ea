# shellcheck shell=bash
# Local services for tests and the demo: apt packages, the venv, redis-server, dockerd,
# and an offline IPFS node (js-ipfs from npm: ensure_ipfs, start_ipfs).
#
# Source it from a bash script that runs with `set -euo pipefail`:
#   source "$root/ops/lib/services.sh"
#   trap stop_started EXIT
#   ensure_apt redis-server docker.io busybox-static
#   ensure_node; ensure_venv; start_redis; start_dockerd; start_ipfs
# Each function prints one short line. stop_started stops, by pid, only what
# start_redis / start_dockerd / start_ipfs started themselves, never a service found running.

WP_ROOT=${WP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
WP_RUN_DIR=${WP_RUN_DIR:-$WP_ROOT/.cache/run}
WP_LOG_DIR=${WP_LOG_DIR:-$WP_ROOT/.cache/logs}
WP_REDIS_PORT=${WP_REDIS_PORT:-6399}
WP_STARTED_REDIS_PID=${WP_STARTED_REDIS_PID:-}
WP_STARTED_DOCKERD_PID=${WP_STARTED_DOCKERD_PID:-}
WP_APT_UPDATED=${WP_APT_UPDATED:-0}
WP_DOCKERD_STORAGE_DRIVERS=${WP_DOCKERD_STORAGE_DRIVERS:-overlay2 vfs}
WP_IPFS_VERSION=${WP_IPFS_VERSION:-0.66.1}
WP_IPFS_DIR=${WP_IPFS_DIR:-$WP_ROOT/.cache/tools/ipfs}
WP_IPFS_REPO=${WP_IPFS_REPO:-$WP_ROOT/.cache/ipfs-repo}
WP_IPFS_API_PORT=${WP_IPFS_API_PORT:-5011}
WP_IPFS_GATEWAY_PORT=${WP_IPFS_GATEWAY_PORT:-8091}
WP_STARTED_IPFS_PID=${WP_STARTED_IPFS_PID:-}
WP_IPFS_USERS_FD=${WP_IPFS_USERS_FD:-}

# ensure_apt PKG...: install the Debian packages that are missing (apt-get update once).
ensure_apt() {
    local pkg missing=()
    for pkg in "$@"; do
        if [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true) != installed ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        echo "apt: present: $*"
        return 0
    fi
    echo "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [[ $WP_APT_UPDATED != 1 ]]; then
        apt-get update -qq
        WP_APT_UPDATED=1
    fi
    apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ensure_node: node and npm on PATH (the devnet fixture runs npm), from apt if missing.
ensure_node() {
    if command -v node >/dev/null && command -v npm >/dev/null; then
        echo "node: $(node --version), npm $(npm --version)"
        return 0
    fi
    ensure_apt nodejs npm
}

# ensure_venv: .venv with the project installed editable ('.[dev,embedded]'); pip runs
# again only when pyproject.toml changed (its sha256 is kept in .venv).
ensure_venv() {
    local venv=$WP_ROOT/.venv hash stamp
    stamp=$venv/.pyproject.sha256
    hash=$(sha256sum "$WP_ROOT/pyproject.toml" | cut -d' ' -f1)
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
            ensure_apt python3-venv
        fi
        python3 -m venv --clear "$venv"
    fi
    if [[ -f $stamp && $(<"$stamp") == "$hash" ]]; then
        echo "venv: .venv up to date with pyproject.toml"
        return 0
    fi
    echo "venv: pip install -e '.[dev,embedded]' into .venv"
    # (the grep drops this machine's pip warnings about find-links folders that don't exist)
    (cd "$WP_ROOT" && "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev,embedded]') 2>&1 |
        { grep -v 'is ignored: it is neither a file nor a directory' || true; }
    echo "$hash" >"$stamp"
}

_wp_redis_ping() {
    [[ $(timeout 3 redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null || true) == PONG ]]
}

_wp_docker_ping() {
    timeout 15 docker info >/dev/null 2>&1
}

# _wp_alive PID: the process exists and is not a zombie.
_wp_alive() {
    local state
    [[ -r /proc/$1/stat ]] || return 1
    state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null || true)
    [[ -n $state && $state != Z ]]
}

# _wp_stop_pid PID NAME SECONDS: SIGTERM, wait, SIGKILL; only if PID is still NAME.
_wp_stop_pid() {
    local pid=$1 name=$2 secs=$3 i
    if ! _wp_alive "$pid" || [[ $(cat "/proc/$pid/comm" 2>/dev/null) != "$name" ]]; then
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < secs * 10; i++)); do
        _wp_alive "$pid" || break
        sleep 0.1
    done
    if _wp_alive "$pid"; then
        echo "$name: pid $pid still running after ${secs}s, sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# start_redis: redis-server on 127.0.0.1:$WP_REDIS_PORT without persistence, unless
# something already answers there; exports WORKERPOOL_TEST_REDIS_URL.
start_redis() {
    local port=$WP_REDIS_PORT pidfile=$WP_RUN_DIR/redis.pid i
    export WORKERPOOL_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
    if _wp_redis_ping "$port"; then
        echo "redis: already answering on 127.0.0.1:$port, using it"
        return 0
    fi
    echo "redis: starting redis-server on 127.0.0.1:$port (no persistence)"
    mkdir -p "$WP_RUN_DIR" "$WP_LOG_DIR"
    rm -f "$pidfile"
    redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --daemonize yes --pidfile "$pidfile" --logfile "$WP_LOG_DIR/redis.log" \
        --dir "$WP_RUN_DIR" </dev/null
    for ((i = 0; i < 100; i++)); do
        if [[ -z $WP_STARTED_REDIS_PID && -s $pidfile ]]; then
            WP_STARTED_REDIS_PID=$(<"$pidfile")
        fi
        if [[ -n $WP_STARTED_REDIS_PID ]] && _wp_redis_ping "$port"; then
            return 0
        fi
        sleep 0.1
    done
    echo "redis: no answer on 127.0.0.1:$port after 10s (see $WP_LOG_DIR/redis.log)" >&2
    return 1
}

# start_dockerd: a Docker engine with no bridge and no iptables, unless `docker info`
# already answers; overlay2 first, vfs if overlay2 does not come up
# (WP_DOCKERD_STORAGE_DRIVERS, space-separated, changes that order).
start_dockerd() {
    local driver pid i log=$WP_LOG_DIR/dockerd.log
    if _wp_docker_ping; then
        echo "dockerd: already answering, using it"
        return 0
    fi
    mkdir -p "$WP_RUN_DIR" "$WP_LOG_DIR"
    : >"$log"
    for driver in $WP_DOCKERD_STORAGE_DRIVERS; do
        echo "dockerd: starting (storage $driver, no bridge, no iptables), log .cache/logs/dockerd.log"
        echo "=== $(date -u +%FT%TZ) dockerd --storage-driver $driver" >>"$log"
        dockerd --bridge=none --iptables=false --ip-masq=false --storage-driver "$driver" \
            --pidfile "$WP_RUN_DIR/dockerd.pid" </dev/null >>"$log" 2>&1 &
        pid=$!
        WP_STARTED_DOCKERD_PID=$pid
        for ((i = 0; i < 60; i++)); do
            if _wp_docker_ping; then
                return 0
            fi
            _wp_alive "$pid" || break
            sleep 0.5
        done
        echo "dockerd: did not come up with $driver (tail of the log below)" >&2
        tail -n 5 "$log" >&2 || true
        _wp_stop_pid "$pid" dockerd 10
        WP_STARTED_DOCKERD_PID=
    done
    return 1
}

# ensure_ipfs: js-ipfs (npm ipfs@$WP_IPFS_VERSION) in $WP_IPFS_DIR, installed only when
# missing or another version. No Kubo binary installs from Debian, PyPI or npm here;
# js-ipfs serves the same /api/v0 RPC API and computes the same CIDs. The mortice
# override is needed on node 20 (the daemon crashes on Promise.withResolvers without it).
# npm installs into a temporary folder that is renamed into place, under a lock, so a
# concurrent or interrupted run never leaves a half-installed tool that looks complete.
ensure_ipfs() {
    local dir=$WP_IPFS_DIR tmp t0 lockfd
    if _wp_ipfs_installed; then
        echo "ipfs: js-ipfs $WP_IPFS_VERSION present in ${dir#"$WP_ROOT"/}"
        return 0
    fi
    ensure_node
    mkdir -p "$(dirname "$dir")"
    exec {lockfd}>"$dir.lock"
    flock "$lockfd"
    if _wp_ipfs_installed; then # another run installed it while we waited for the lock
        exec {lockfd}>&-
        echo "ipfs: js-ipfs $WP_IPFS_VERSION present in ${dir#"$WP_ROOT"/}"
        return 0
    fi
    echo "ipfs: installing npm ipfs@$WP_IPFS_VERSION (js-ipfs) into ${dir#"$WP_ROOT"/} (a few minutes the first time)"
    t0=$SECONDS
    tmp=$(mktemp -d "$dir.tmp.XXXXXX")
    chmod 755 "$tmp"
    cat >"$tmp/package.json" <<JSON
{
  "name": "workerpool-ipfs-tool",
  "private": true,
  "description": "js-ipfs for workerpool tests and the demo (installed by ops/lib/services.sh)",
  "dependencies": { "ipfs": "$WP_IPFS_VERSION" },
  "overrides": { "mortice": "3.0.6" }
}
JSON
    if ! (cd "$tmp" && npm install --no-audit --no-fund --omit=dev --loglevel=error >"$tmp/npm.log" 2>&1); then
        echo "ipfs: npm install failed (tail of the log below)" >&2
        tail -n 20 "$tmp/npm.log" >&2 || true
        rm -rf "$tmp"
        exec {lockfd}>&-
        return 1
    fi
    rm -rf "$dir"
    mv "$tmp" "$dir"
    exec {lockfd}>&-
    echo "ipfs: installed in $((SECONDS - t0))s"
}

_wp_ipfs_installed() {
    [[ -x $WP_IPFS_DIR/node_modules/.bin/jsipfs ]] &&
        [[ $(node -p "require('$WP_IPFS_DIR/node_modules/ipfs/package.json').version" 2>/dev/null || true) == "$WP_IPFS_VERSION" ]]
}

# (the daemon's process title, hence its /proc comm, is "ipfs": js-ipfs sets it)
_wp_ipfs_ping() {
    curl -fsS -o /dev/null -m 3 -X POST "http://127.0.0.1:$1/api/v0/id" 2>/dev/null
}

# _wp_ipfs_clear_stale_lock REPO PIDFILE: a daemon killed hard leaves repo.lock (and the
# api file) behind; js-ipfs itself treats a lock untouched for 20 s as stale. Remove them
# when that is so, or at once when the daemon of our pidfile is gone. A fresh lock of a
# live daemon is left alone: the start then fails and its log says who holds the repo.
_wp_ipfs_clear_stale_lock() {
    local repo=$1 pidfile=$2 age
    [[ -e $repo/repo.lock ]] || return 0
    age=$(($(date +%s) - $(stat -c %Y "$repo/repo.lock")))
    if ((age > 25)) || { [[ -s $pidfile ]] && ! _wp_alive "$(<"$pidfile")"; }; then
        echo "ipfs: removing the stale lock of a daemon that did not shut down cleanly"
        rm -rf "$repo/repo.lock" "$repo/api"
    fi
}

# start_ipfs: an offline js-ipfs daemon, RPC API on 127.0.0.1:$WP_IPFS_API_PORT and gateway
# on 127.0.0.1:$WP_IPFS_GATEWAY_PORT, unless an IPFS API already answers on that port;
# exports WORKERPOOL_TEST_IPFS_API and WORKERPOOL_TEST_IPFS_GATEWAY. The repo ($WP_IPFS_REPO)
# is created once; its config is rewritten on every start (ports from the environment, no
# swarm, no bootstrap, no MDNS: the node never talks to the network, results only need to be
# added, pinned and read).
#
# Several ops/test runs share one checkout here, so a daemon one run started may be in use
# by another. Each run holds a shared lock on .cache/run/ipfs.users.lock from here until
# stop_started; starts are serialized by .cache/run/ipfs.start.lock (no double init, no
# second daemon racing for the repo). stop_started stops the daemon only when no other run
# holds the shared lock (see _wp_ipfs_release).
start_ipfs() {
    local port=$WP_IPFS_API_PORT startfd rc=0
    export WORKERPOOL_TEST_IPFS_API="http://127.0.0.1:$port"
    export WORKERPOOL_TEST_IPFS_GATEWAY="http://127.0.0.1:$WP_IPFS_GATEWAY_PORT"
    mkdir -p "$WP_RUN_DIR" "$WP_LOG_DIR"
    if [[ -z $WP_IPFS_USERS_FD ]]; then
        exec {WP_IPFS_USERS_FD}>>"$WP_RUN_DIR/ipfs.users.lock"
        flock -s "$WP_IPFS_USERS_FD"
    fi
    exec {startfd}>>"$WP_RUN_DIR/ipfs.start.lock"
    flock "$startfd"
    if _wp_ipfs_ping "$port"; then
        echo "ipfs: already answering on 127.0.0.1:$port, using it"
    else
        _wp_ipfs_start_daemon "$startfd" || rc=$?
    fi
    exec {startfd}>&-
    return "$rc"
}

# _wp_ipfs_start_daemon STARTFD: init the repo if needed, write its config, start the
# daemon and wait for its API (start_ipfs holds the start lock, fd STARTFD).
_wp_ipfs_start_daemon() {
    local startfd=$1 port=$WP_IPFS_API_PORT gw=$WP_IPFS_GATEWAY_PORT repo=$WP_IPFS_REPO
    local bin=$WP_IPFS_DIR/node_modules/.bin/jsipfs log=$WP_LOG_DIR/ipfs.log
    local pidfile=$WP_RUN_DIR/ipfs.pid pid i t0
    ensure_ipfs
    if [[ -s $pidfile ]] && _wp_alive "$(<"$pidfile")" &&
        [[ $(cat "/proc/$(<"$pidfile")/comm" 2>/dev/null) == ipfs ]]; then
        echo "ipfs: pid $(<"$pidfile") ($pidfile) runs but does not answer on :$port; stop it first" >&2
        return 1
    fi
    if [[ ! -f $repo/config ]]; then
        echo "ipfs: initializing repo ${repo#"$WP_ROOT"/}"
        rm -rf "$repo"
        if ! IPFS_PATH=$repo "$bin" init --empty-repo >>"$log" 2>&1; then
            echo "ipfs: init failed (tail of $log below)" >&2
            tail -n 10 "$log" >&2 || true
            return 1
        fi
    fi
    _wp_ipfs_clear_stale_lock "$repo" "$pidfile"
    IPFS_PATH=$repo WP_API="/ip4/127.0.0.1/tcp/$port" WP_GW="/ip4/127.0.0.1/tcp/$gw" node -e '
        const fs = require("fs"), file = process.env.IPFS_PATH + "/config";
        const c = JSON.parse(fs.readFileSync(file, "utf8"));
        // (Addresses.RPC is js-ipfs'"'"'s own gRPC-over-websocket server: not needed, removed)
        c.Addresses = { ...c.Addresses, API: process.env.WP_API, Gateway: process.env.WP_GW,
                        Swarm: [], Announce: [], NoAnnounce: [], Delegates: [] };
        delete c.Addresses.RPC;
        c.Bootstrap = [];
        c.Discovery = { ...c.Discovery, MDNS: { Enabled: false }, webRTCStar: { Enabled: false } };
        fs.writeFileSync(file, JSON.stringify(c, null, 2));
    '
    echo "ipfs: starting js-ipfs daemon (offline) on 127.0.0.1:$port, gateway :$gw, log ${log#"$WP_ROOT"/}"
    t0=$SECONDS
    echo "=== $(date -u +%FT%TZ) jsipfs daemon --offline" >>"$log"
    # the daemon must not inherit our lock fds: it would hold the locks for its whole life
    IPFS_PATH=$repo "$bin" daemon --offline --enable-preload=false </dev/null >>"$log" 2>&1 \
        {WP_IPFS_USERS_FD}>&- {startfd}>&- &
    pid=$!
    for ((i = 0; i < 600; i++)); do
        if ! _wp_alive "$pid"; then
            break
        elif _wp_ipfs_ping "$port"; then
            WP_STARTED_IPFS_PID=$pid
            echo "$pid" >"$pidfile"
            echo "ipfs: up in $((SECONDS - t0))s (pid $pid)"
            return 0
        fi
        sleep 0.1
    done
    echo "ipfs: no answer on 127.0.0.1:$port after $((SECONDS - t0))s (tail of $log below)" >&2
    tail -n 10 "$log" >&2 || true
    _wp_stop_pid "$pid" ipfs 10
    return 1
}

# _wp_ipfs_release: end this run's use of IPFS. The last run out (it alone gets the lock
# exclusively) stops the daemon start_ipfs started, by the pid in .cache/run/ipfs.pid,
# whichever run started it; a daemon found running (no pidfile of ours) is never stopped.
_wp_ipfs_release() {
    local pidfile=$WP_RUN_DIR/ipfs.pid pid=
    [[ -n $WP_IPFS_USERS_FD ]] || return 0
    if [[ -s $pidfile ]]; then
        pid=$(<"$pidfile")
    fi
    if flock -xn "$WP_IPFS_USERS_FD"; then
        if [[ -n $pid ]] && _wp_alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == ipfs ]]; then
            echo "ipfs: stopping pid $pid (started by start_ipfs, no other run uses it)"
            _wp_stop_pid "$pid" ipfs 15
        fi
        rm -f "$pidfile"
    elif [[ -n $pid ]] && _wp_alive "$pid"; then
        echo "ipfs: pid $pid is used by another run: left running (the last run out stops it)"
    fi
    exec {WP_IPFS_USERS_FD}>&-
    WP_IPFS_USERS_FD=
    WP_STARTED_IPFS_PID=
}

# stop_started: stop, by pid, what start_redis and start_dockerd started (nothing else);
# IPFS: see _wp_ipfs_release (the last ops run out stops the daemon an ops run started).
stop_started() {
    _wp_ipfs_release
    if [[ -z $WP_STARTED_DOCKERD_PID && -z $WP_STARTED_REDIS_PID ]]; then
        echo "services: nothing started here, nothing to stop"
        return 0
    fi
    if [[ -n $WP_STARTED_DOCKERD_PID ]]; then
        echo "dockerd: stopping pid $WP_STARTED_DOCKERD_PID (started here)"
        _wp_stop_pid "$WP_STARTED_DOCKERD_PID" dockerd 30
        WP_STARTED_DOCKERD_PID=
    fi
    if [[ -n $WP_STARTED_REDIS_PID ]]; then
        echo "redis: stopping pid $WP_STARTED_REDIS_PID (started here)"
        _wp_stop_pid "$WP_STARTED_REDIS_PID" redis-server 10
        WP_STARTED_REDIS_PID=
        rm -f "$WP_RUN_DIR/redis.pid"
    fi
}
