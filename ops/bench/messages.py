"""Measurement: what signing every worker -> scheduler message costs.

``python ops/bench/messages.py [--count N]`` prints one JSON object, in microseconds per
message (median of ``--repeat`` rounds of ``--count`` messages, on this machine, nothing
else asked of it):

* ``seal``: a worker node's :class:`pool.messages.MessageSigner` (canonical JSON of the
  payload, the EIP-712 digest with the domain separator and type hash computed once,
  secp256k1 with coincurve);
* ``open``: the scheduler's :meth:`pool.messages.Message.open` (the digest, recovering the
  signer, the payload parsed and checked);
* ``eth_account_sign`` / ``eth_account_recover``: the same signature made and checked with
  eth_account's typed-data functions, the reference the digest is pinned to
  (``tests/test_messages.py``), for scale;

for a heartbeat, an authorization request and the largest status report (a failure with its
reason and log tail), and per trust-1 task (the 7 messages a node sends for one: authorize,
STARTING, APP_DOWNLOADING, COMPUTING, COMPUTED, CONTRIBUTING, COMPLETED).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eth_account import Account  # noqa: E402
from eth_account.messages import encode_typed_data  # noqa: E402
from eth_utils import keccak  # noqa: E402

from pool.messages import (  # noqa: E402
    AUTHORIZE,
    HEARTBEAT,
    MESSAGE_TYPE,
    REPORT,
    AuthorizeRequest,
    Domain,
    Heartbeat,
    MessageSigner,
    ReplicateReport,
)
from pool.states import ReplicateStatus  # noqa: E402

KEY = "0x" + "4c" * 32
DOMAIN = Domain(134, "0x" + "11" * 20)
TASK = "0x" + "7a" * 32
TRUST1_MESSAGES = 7


def _per_call(fn: Callable[[], Any], count: int, repeat: int) -> float:
    """Median microseconds per call of ``fn`` over ``repeat`` rounds of ``count`` calls."""
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(count):
            fn()
        rounds.append((time.perf_counter() - start) / count * 1e6)
    return round(statistics.median(rounds), 1)


def _typed(envelope: dict[str, Any]) -> dict[str, Any]:
    fields = [p.split(" ") for p in MESSAGE_TYPE.removeprefix("WorkerMessage(")[:-1].split(",")]
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "WorkerMessage": [{"name": n, "type": t} for t, n in fields],
        },
        "primaryType": "WorkerMessage",
        "domain": DOMAIN.typed_data(),
        "message": {
            "kind": envelope["kind"],
            "worker": envelope["worker"],
            "bodyHash": keccak(text=envelope["body"]),
            "nonce": bytes.fromhex(envelope["nonce"][2:]),
            "issuedAt": envelope["issuedAt"],
        },
    }


def run(count: int, repeat: int) -> dict[str, Any]:
    signer = MessageSigner(KEY, DOMAIN)
    me = signer.address
    messages: dict[str, tuple[Any, Any]] = {
        "heartbeat": (HEARTBEAT, Heartbeat(me, "node-1", ("standard",), 4, 1, "0.1.0", 8, 16000)),
        "authorize": (AUTHORIZE, AuthorizeRequest(TASK, me)),
        "report": (
            REPORT,
            ReplicateReport(
                TASK,
                me,
                ReplicateStatus.COMPUTE_FAILED,
                reason="app exited with code 3",
                log_tail="x" * 4000,
                exit_code=3,
                duration=12.5,
            ),
        ),
    }
    out: dict[str, Any] = {"count": count, "repeat": repeat, "us_per_message": {}}
    for name, (message, payload) in messages.items():
        envelope = signer.seal(message, payload)
        typed = _typed(envelope)
        signature = bytes.fromhex(envelope["sig"][2:])
        out["us_per_message"][name] = {
            "body_bytes": len(envelope["body"]),
            "seal": _per_call(lambda m=message, p=payload: signer.seal(m, p), count, repeat),
            "open": _per_call(lambda m=message, e=envelope: m.open(e, DOMAIN), count, repeat),
            "eth_account_sign": _per_call(
                lambda t=typed: Account.sign_typed_data(KEY, full_message=t), count, repeat
            ),
            "eth_account_recover": _per_call(
                lambda t=typed, s=signature: Account.recover_message(
                    encode_typed_data(full_message=t), signature=s
                ),
                count,
                repeat,
            ),
        }
    small = out["us_per_message"]["authorize"]
    out["us_per_trust1_task"] = {
        "worker_seal": round(small["seal"] * TRUST1_MESSAGES, 1),
        "scheduler_open": round(small["open"] * TRUST1_MESSAGES, 1),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="messages per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (the median is kept)")
    args = parser.parse_args()
    print(json.dumps(run(args.count, args.repeat), indent=1))


if __name__ == "__main__":
    main()
