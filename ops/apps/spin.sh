#!/bin/sh
# workerpool-apps/spin:1 - counts to <arg1> (default 1000000) in the shell, then writes
# result.txt and computed.json: deterministic CPU work, as long as the node's CPU share
# makes it (WORKERPOOL_APP_CPUS).
set -eu
out=${IEXEC_OUT:-/iexec_out}
n=${1:-1000000}
i=0
while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
done
echo "counted to $n" >"$out/result.txt"
printf '{"deterministic-output-path":"%s/result.txt"}\n' "$out" >"$out/computed.json"
echo "spin app: counted to $n"
