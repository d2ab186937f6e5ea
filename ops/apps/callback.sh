#!/bin/sh
# workerpool-apps/callback:1 - an app for deals with a callback contract: it writes its args,
# hex-encoded, as the callback-data of $IEXEC_OUT/computed.json (what PoCo hands the
# consumer's receiveResult), and result.txt with the args in clear.
set -eu
out=${IEXEC_OUT:-/iexec_out}
mkdir -p "$out"
hex=$(printf '%s' "$*" | od -An -v -tx1 | tr -d ' \n')
printf 'args: %s\n' "$*" >"$out/result.txt"
printf '{"callback-data":"0x%s"}\n' "$hex" >"$out/computed.json"
echo "callback app: callback-data 0x$hex"
