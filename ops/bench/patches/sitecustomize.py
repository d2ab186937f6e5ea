"""Loaded by every Python process the benchmark starts (PYTHONPATH): counts the chain usage
of the process when WORKERPOOL_BENCH_USAGE_FILE is set (see ops/bench/usage.py), and applies
the experiments named in WORKERPOOL_BENCH_TRY (see ops/bench/experiments.py). Does nothing
otherwise."""

import os
import sys

if os.environ.get("WORKERPOOL_BENCH_TRY") or os.environ.get("WORKERPOOL_BENCH_USAGE_FILE"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("WORKERPOOL_BENCH_USAGE_FILE"):
    import usage

    usage.install(os.environ["WORKERPOOL_BENCH_USAGE_FILE"])

if os.environ.get("WORKERPOOL_BENCH_TRY"):
    import experiments

    experiments.apply()
