#!/bin/sh
# workerpool-apps/bigout:1 - writes $IEXEC_OUT/big.bin of <arg1> MB (default 200)
# of zeros, and computed.json pointing at it: for output size limits.
set -eu
out=${IEXEC_OUT:-/iexec_out}
mb=${1:-200}
mkdir -p "$out"
dd if=/dev/zero of="$out/big.bin" bs=1048576 count="$mb" 2>/dev/null
printf '{"deterministic-output-path":"%s/big.bin"}\n' "$out" >"$out/computed.json"
echo "bigout app: wrote $mb MB to $out/big.bin"
