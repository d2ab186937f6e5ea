#!/bin/sh
# workerpool-apps/nocomputed:1 - writes result.txt but no computed.json, exits 0:
# an app that breaks the iExec output contract.
set -eu
out=${IEXEC_OUT:-/iexec_out}
mkdir -p "$out"
echo "no computed.json here" >"$out/result.txt"
echo "nocomputed app: wrote $out/result.txt and no computed.json"
