"""The iExec protocol (PoCo v6): ABIs, typed orders and EIP-712, ids and proofs, a chain client.

Nothing in this package knows about Celery, Redis or MongoDB; every service builds on it.
"""

POCO_VERSION = "6.1.0"
