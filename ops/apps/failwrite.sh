#!/bin/sh
# workerpool-apps/failwrite:1 - writes result.txt (its args) and a computed.json naming it,
# then exits with code <arg1> (default 1): an app that fails after writing its output
# (iexec-worker v9.2 contributes what computed.json says).
set -u
out=${IEXEC_OUT:-/iexec_out}
code=${1:-1}
printf 'failwrite: %s\n' "$*" >"$out/result.txt"
printf '{"deterministic-output-path":"%s/result.txt"}\n' "$out" >"$out/computed.json"
echo "failwrite app: wrote $out/result.txt, exiting with $code" >&2
exit "$code"
