#!/bin/sh
# workerpool-apps/crash:1 - an app that fails: a line on stderr, exit code 3.
echo "crash app: starting"
echo "boom: something went wrong" >&2
exit 3
