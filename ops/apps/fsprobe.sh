#!/bin/sh
# workerpool-apps/fsprobe:1 - what the app may write besides /iexec_out, by mode <arg1>:
#   rootfs    tries to write into its root filesystem (/, /root, /app) and says how it went
#   tmpfill   writes <arg2> MB (default 100) into /tmp and says how much it could
# then writes a valid result.
set -eu
out=${IEXEC_OUT:-/iexec_out}
mode=${1:-rootfs}
case $mode in
rootfs)
    for target in /probe.txt /root/probe.txt /app/probe.txt; do
        if echo probe 2>/dev/null >"$target"; then
            echo "fsprobe app: wrote $target"
        else
            echo "fsprobe app: could not write $target"
        fi
    done
    ;;
tmpfill)
    mb=${2:-100}
    dd if=/dev/zero of=/tmp/fill bs=1048576 count="$mb" 2>/dev/null || true
    echo "fsprobe app: /tmp/fill holds $(wc -c </tmp/fill) bytes"
    ;;
*)
    echo "fsprobe app: unknown mode $mode" >&2
    exit 2
    ;;
esac
echo "$mode result" >"$out/result.txt"
printf '{"deterministic-output-path":"%s/result.txt"}\n' "$out" >"$out/computed.json"
