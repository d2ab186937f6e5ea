"""PoCo's consensus arithmetic (Poco2 ``contribute``/``checkConsensus``), for planning.

A worker with score ``s`` weighs ``max(s // 3, 3) - 1`` (2 for a new worker). Agreeing
contributions multiply into their group's weight; with every contribution agreeing the total is
``1 + group``, and consensus holds when ``group * trust > total * (trust - 1)``, i.e. when the
product of the agreeing weights reaches ``trust``.
"""

from __future__ import annotations

from collections.abc import Iterable

FRESH_WEIGHT = 2


def worker_weight(score: int) -> int:
    return max(score // 3, 3) - 1


def consensus_reached(group: int, total: int, trust: int) -> bool:
    return group > 0 and group * trust > total * (trust - 1)


def replicates_needed(trust: int, weights: Iterable[int] | None = None) -> int:
    """Fewest agreeing contributions that reach consensus for ``trust``.

    ``weights`` are the weights of the workers that would contribute, best first; workers
    beyond the list (or all, when none is given) count as fresh (weight 2).
    """
    trust = max(trust, 1)
    pool = sorted(weights or (), reverse=True)
    group, count = 1, 0
    while True:
        weight = pool[count] if count < len(pool) else FRESH_WEIGHT
        group *= weight
        count += 1
        if consensus_reached(group, 1 + group, trust):
            return count


def simulate(contributions: list[tuple[str, int]]) -> tuple[dict[str, int], int]:
    """Replay PoCo's bookkeeping over (resultHash, weight) in contribution order.

    Returns the group weight of each result and the running total, as the contract holds them.
    """
    groups: dict[str, int] = {}
    total = 1
    for result, weight in contributions:
        group = groups.get(result, 0)
        delta = max(group, 1) * weight - group
        groups[result] = group + delta
        total += delta
    return groups, total


def more_replicates_needed(contributions: list[tuple[str, int]], trust: int) -> int:
    """Fewest further fresh contributions, all agreeing on one result, that reach consensus.

    Tries every result already contributed and a brand-new one, and keeps the cheapest: the
    scheduler plans that many more replicates when contributions disagree.
    """
    trust = max(trust, 1)
    groups, total = simulate(contributions)
    best: int | None = None
    for start in [*groups.values(), 0]:
        group, tot, count = start, total, 0
        while not consensus_reached(group, tot, trust):
            delta = max(group, 1) * FRESH_WEIGHT - group
            group, tot, count = group + delta, tot + delta, count + 1
            if count > 64:
                break
        if best is None or count < best:
            best = count
    return best or 0
