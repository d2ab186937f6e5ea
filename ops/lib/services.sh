# shellcheck shell=bash
# Local services for tests and the demo: apt packages, the venv, redis-server, dockerd.
#
# Source it from a bash script that runs with `set -euo pipefail`:
#   source "$root/ops/lib/services.sh"
#   trap stop_started EXIT
#   ensure_apt redis-server docker.io busybox-static
#   ensure_node; ensure_venv; start_redis; start_dockerd
# Each function prints one short line. stop_started stops, by pid, only what
# start_redis / start_dockerd started themselves, never a service found running.

WP_ROOT=${WP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
WP_RUN_DIR=${WP_RUN_DIR:-$WP_ROOT/.cache/run}
WP_LOG_DIR=${WP_LOG_DIR:-$WP_ROOT/.cache/logs}
WP_REDIS_PORT=${WP_REDIS_PORT:-6399}
WP_STARTED_REDIS_PID=${WP_STARTED_REDIS_PID:-}
WP_STARTED_DOCKERD_PID=${WP_STARTED_DOCKERD_PID:-}
WP_APT_UPDATED=${WP_APT_UPDATED:-0}
WP_DOCKERD_STORAGE_DRIVERS=${WP_DOCKERD_STORAGE_DRIVERS:-overlay2 vfs}

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

# stop_started: stop, by pid, what start_redis and start_dockerd started (nothing else).
stop_started() {
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
