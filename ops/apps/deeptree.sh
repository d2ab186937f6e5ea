#!/bin/sh
# workerpool-apps/deeptree:1 - a tree of <arg1> levels (default 40) of folders named with
# <arg2> characters (default 200), a file at the bottom, and computed.json naming the whole
# output: a path far longer than PATH_MAX (4096) for whoever measures or zips /iexec_out.
set -eu
out=${IEXEC_OUT:-/iexec_out}
levels=${1:-40}
length=${2:-200}
name=$(head -c "$length" /dev/zero | tr '\0' 'd')
printf '{"deterministic-output-path":"%s"}\n' "$out" >"$out/computed.json"
cd "$out"
i=0
while [ "$i" -lt "$levels" ]; do
    mkdir "$name"
    cd -P "$name" # -P: a relative chdir, whatever the length of the whole path
    i=$((i + 1))
done
echo "bottom of $levels levels" >f
echo "deeptree app: $levels levels of $length-character names"
