#!/bin/sh
# workerpool-apps/sleep:1 - sleeps <arg1> seconds (default 3600), then writes
# result.txt and computed.json: for timeouts and aborts. As PID 1 the shell would
# ignore SIGTERM, so it traps it to let `docker stop` end it at once.
set -eu
out=${IEXEC_OUT:-/iexec_out}
secs=${1:-3600}
trap 'echo "sleep app: stopped"; exit 143' TERM
trap 'exit 130' INT
echo "sleep app: sleeping ${secs}s"
sleep "$secs" &
wait $!
mkdir -p "$out"
echo "slept $secs" >"$out/result.txt"
printf '{"deterministic-output-path":"%s/result.txt"}\n' "$out" >"$out/computed.json"
echo "sleep app: done"
