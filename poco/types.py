"""Plain views of PoCo's on-chain structs (hex strings for bytes, ints for numbers)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from eth_utils import to_checksum_address


class ChainTaskStatus(IntEnum):
    UNSET = 0
    ACTIVE = 1
    REVEALING = 2
    COMPLETED = 3
    FAILED = 4


class ContributionStatus(IntEnum):
    UNSET = 0
    CONTRIBUTED = 1
    PROVED = 2
    REJECTED = 3


def _hex(value: Any) -> str:
    return "0x" + bytes(value).hex()


@dataclass(frozen=True)
class Resource:
    pointer: str
    owner: str
    price: int


@dataclass(frozen=True)
class Deal:
    dealid: str
    app: Resource
    dataset: Resource
    workerpool: Resource
    trust: int
    category: int
    tag: str
    requester: str
    beneficiary: str
    callback: str
    params: str
    start_time: int
    bot_first: int
    bot_size: int
    worker_stake: int
    scheduler_reward_ratio: int
    sponsor: str

    @property
    def exists(self) -> bool:
        return int(self.app.pointer, 16) != 0

    @classmethod
    def from_chain(cls, dealid: str, raw: Any) -> Deal:
        def res(r: Any) -> Resource:
            return Resource(to_checksum_address(r.pointer), to_checksum_address(r.owner), r.price)

        return cls(
            dealid=dealid,
            app=res(raw.app),
            dataset=res(raw.dataset),
            workerpool=res(raw.workerpool),
            trust=raw.trust,
            category=raw.category,
            tag=_hex(raw.tag),
            requester=raw.requester,
            beneficiary=raw.beneficiary,
            callback=raw.callback,
            params=raw.params,
            start_time=raw.startTime,
            bot_first=raw.botFirst,
            bot_size=raw.botSize,
            worker_stake=raw.workerStake,
            scheduler_reward_ratio=raw.schedulerRewardRatio,
            sponsor=raw.sponsor,
        )


@dataclass(frozen=True)
class Task:
    taskid: str
    status: ChainTaskStatus
    dealid: str
    idx: int
    timeref: int
    contribution_deadline: int
    reveal_deadline: int
    final_deadline: int
    consensus_value: str
    reveal_counter: int
    winner_counter: int
    contributors: tuple[str, ...]
    result_digest: str
    results: bytes
    results_timestamp: int
    results_callback: bytes

    @classmethod
    def from_chain(cls, taskid: str, raw: Any) -> Task:
        return cls(
            taskid=taskid,
            status=ChainTaskStatus(raw.status),
            dealid=_hex(raw.dealid),
            idx=raw.idx,
            timeref=raw.timeref,
            contribution_deadline=raw.contributionDeadline,
            reveal_deadline=raw.revealDeadline,
            final_deadline=raw.finalDeadline,
            consensus_value=_hex(raw.consensusValue),
            reveal_counter=raw.revealCounter,
            winner_counter=raw.winnerCounter,
            contributors=tuple(raw.contributors),
            result_digest=_hex(raw.resultDigest),
            results=bytes(raw.results),
            results_timestamp=raw.resultsTimestamp,
            results_callback=bytes(raw.resultsCallback),
        )


@dataclass(frozen=True)
class Contribution:
    status: ContributionStatus
    result_hash: str
    result_seal: str
    enclave_challenge: str
    weight: int

    @classmethod
    def from_chain(cls, raw: Any) -> Contribution:
        return cls(
            status=ContributionStatus(raw.status),
            result_hash=_hex(raw.resultHash),
            result_seal=_hex(raw.resultSeal),
            enclave_challenge=raw.enclaveChallenge,
            weight=raw.weight,
        )


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    description: str
    work_clock_time_ref: int


@dataclass(frozen=True)
class Account:
    stake: int
    locked: int
