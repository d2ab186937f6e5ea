"""Test doubles of the chain, Celery and the store, shared by the fast unit tests and
``ops/bench`` (never imported by runtime code)."""
