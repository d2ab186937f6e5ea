"""Loaded by every Python process the benchmark starts (PYTHONPATH): applies the experiments
named in WORKERPOOL_BENCH_TRY (see ops/bench/experiments.py). Does nothing otherwise."""

import os
import sys

if os.environ.get("WORKERPOOL_BENCH_TRY"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import experiments

    experiments.apply()
