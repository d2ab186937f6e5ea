#!/bin/sh
# workerpool-apps/echo:1 - the sample iExec app of the tests.
# Writes $IEXEC_OUT/result.txt (deterministic for the same args, env and inputs):
#   args: <all args>
#   IEXEC_TASK_ID=<value>            (then IEXEC_DEAL_ID, IEXEC_TASK_INDEX, IEXEC_BOT_SIZE)
#   IEXEC_INPUT_FILES_NUMBER=<n>
#   IEXEC_INPUT_FILE_NAME_<i>=<name> then the content of $IEXEC_INPUT_FILES_FOLDER/<name>
#   IEXEC_DATASET_FILENAME=<name>    then the content of $IEXEC_IN/<name> (if set)
# and $IEXEC_OUT/computed.json = {"deterministic-output-path":"<IEXEC_OUT>/result.txt"}.
set -eu
out=${IEXEC_OUT:-/iexec_out}
inputs=${IEXEC_INPUT_FILES_FOLDER:-/iexec_in}
mkdir -p "$out"

# show_file PATH: its content, ended by a newline even if the file has none
show_file() {
    cat "$1"
    if [ -n "$(tail -c 1 "$1")" ]; then echo; fi
}

{
    echo "args: $*"
    echo "IEXEC_TASK_ID=${IEXEC_TASK_ID:-}"
    echo "IEXEC_DEAL_ID=${IEXEC_DEAL_ID:-}"
    echo "IEXEC_TASK_INDEX=${IEXEC_TASK_INDEX:-}"
    echo "IEXEC_BOT_SIZE=${IEXEC_BOT_SIZE:-}"
    n=${IEXEC_INPUT_FILES_NUMBER:-0}
    echo "IEXEC_INPUT_FILES_NUMBER=$n"
    i=1
    name=
    while [ "$i" -le "$n" ]; do
        eval "name=\${IEXEC_INPUT_FILE_NAME_$i:-}"
        echo "IEXEC_INPUT_FILE_NAME_$i=$name"
        show_file "$inputs/$name"
        i=$((i + 1))
    done
    if [ -n "${IEXEC_DATASET_FILENAME:-}" ]; then
        echo "IEXEC_DATASET_FILENAME=$IEXEC_DATASET_FILENAME"
        show_file "${IEXEC_IN:-/iexec_in}/$IEXEC_DATASET_FILENAME"
    fi
} >"$out/result.txt"

printf '{"deterministic-output-path":"%s/result.txt"}\n' "$out" >"$out/computed.json"
echo "echo app: args: $*"
echo "echo app: task ${IEXEC_TASK_ID:-?} wrote $out/result.txt"
