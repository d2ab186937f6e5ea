"""Why did a PoCo call revert? Poco2's checks are bare ``require``s, so read the state.

Each function mirrors the ``require`` list of one function of ``IexecPoco2Facet.sol`` (v6.1.0)
in the order the contract checks them, and returns the first one that fails, in words an
operator can act on. They only read; an empty string means nothing explains the revert.
"""

from __future__ import annotations

from poco.chain import ChainClient
from poco.orders import ZERO_ADDRESS
from poco.proofs import recover_authorization_signer, result_hash, result_seal, task_id
from poco.tags import is_tee
from poco.types import ChainTaskStatus, ContributionStatus


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def initialize(client: ChainClient, dealid: str, idx: int) -> str:
    deal = client.view_deal(dealid)
    if not deal.exists:
        return f"deal {dealid} does not exist on this chain"
    if not deal.bot_first <= idx < deal.bot_first + deal.bot_size:
        return (
            f"task index {idx} is outside the deal's range "
            f"[{deal.bot_first}, {deal.bot_first + deal.bot_size})"
        )
    task = client.view_task(task_id(dealid, idx))
    if task.status != ChainTaskStatus.UNSET:
        return f"task {task.taskid} is already initialized (status {task.status.name})"
    return ""


def contribute(
    client: ChainClient,
    worker: str,
    taskid: str,
    authorization: str,
    enclave: str = ZERO_ADDRESS,
) -> str:
    task = client.view_task(taskid)
    now = client.block_timestamp()
    if task.status != ChainTaskStatus.ACTIVE:
        return _not_active(task.status, "contribute")
    if task.contribution_deadline <= now:
        return f"the contribution deadline passed ({task.contribution_deadline} <= {now})"
    contribution = client.view_contribution(taskid, worker)
    if contribution.status != ContributionStatus.UNSET:
        return f"worker {worker} already contributed to this task ({contribution.status.name})"
    deal = client.view_deal(task.dealid)
    if _same(enclave, ZERO_ADDRESS) and is_tee(deal.tag):
        return "the deal is TEE (tag bit 0) and needs an enclave challenge"
    expected = deal.workerpool.owner
    try:
        signer = recover_authorization_signer(authorization, worker, taskid, enclave)
    except Exception as exc:
        return f"the authorization signature does not decode ({exc})"
    if not _same(signer, expected):
        return (
            f"invalid authorization: it recovers to {signer} for (worker={worker}, "
            f"task={taskid}), but the workerpool owner (scheduler) is {expected}"
        )
    account = client.view_account(worker)
    if account.stake < deal.worker_stake:
        return (
            f"worker {worker} has {account.stake} nRLC deposited, below the worker stake "
            f"{deal.worker_stake} the deal requires"
        )
    return ""


def contribute_and_finalize(
    client: ChainClient,
    worker: str,
    taskid: str,
    authorization: str,
    results_callback: bytes = b"",
    enclave: str = ZERO_ADDRESS,
) -> str:
    task = client.view_task(taskid)
    if task.status == ChainTaskStatus.ACTIVE and task.contributors:
        return "contributeAndFinalize needs a task nobody contributed to yet"
    deal = client.view_deal(task.dealid) if task.status != ChainTaskStatus.UNSET else None
    if deal is not None and deal.trust != 1:
        return f"contributeAndFinalize needs trust 1; the deal has trust {deal.trust}"
    if deal is not None and _same(deal.callback, ZERO_ADDRESS) and results_callback:
        return "resultsCallback must be empty when the deal has no callback"
    return contribute(client, worker, taskid, authorization, enclave)


def reveal(client: ChainClient, worker: str, taskid: str, digest: str) -> str:
    task = client.view_task(taskid)
    now = client.block_timestamp()
    if task.status != ChainTaskStatus.REVEALING:
        return _not_active(task.status, "reveal", want="REVEALING")
    if task.reveal_deadline <= now:
        return f"the reveal deadline passed ({task.reveal_deadline} <= {now})"
    contribution = client.view_contribution(taskid, worker)
    if contribution.status != ContributionStatus.CONTRIBUTED:
        return (
            f"worker {worker} has contribution status {contribution.status.name}, not CONTRIBUTED"
        )
    if contribution.result_hash != task.consensus_value:
        return "the worker's contribution is not the consensus value (it lost the vote)"
    if contribution.result_hash != result_hash(taskid, digest):
        return "the revealed digest does not match the contributed resultHash"
    if contribution.result_seal != result_seal(worker, taskid, digest):
        return "the revealed digest does not match the contributed resultSeal"
    return ""


def finalize(client: ChainClient, sender: str, taskid: str, results_callback: bytes = b"") -> str:
    task = client.view_task(taskid)
    if task.status == ChainTaskStatus.UNSET:
        return f"task {taskid} is not initialized"
    deal = client.view_deal(task.dealid)
    if not _same(sender, deal.workerpool.owner):
        return (
            f"only the scheduler (the workerpool owner {deal.workerpool.owner}) may finalize; "
            f"the sender is {sender}"
        )
    now = client.block_timestamp()
    if task.status != ChainTaskStatus.REVEALING:
        return _not_active(task.status, "finalize", want="REVEALING")
    if task.final_deadline <= now:
        return f"the final deadline passed ({task.final_deadline} <= {now}); claim instead"
    if not (
        task.reveal_counter == task.winner_counter
        or (task.reveal_counter > 0 and task.reveal_deadline <= now)
    ):
        return (
            f"only {task.reveal_counter} of {task.winner_counter} winners revealed and the reveal "
            f"deadline ({task.reveal_deadline}) has not passed"
        )
    if _same(deal.callback, ZERO_ADDRESS) and results_callback:
        return "resultsCallback must be empty when the deal has no callback"
    return ""


def claim(client: ChainClient, taskid: str) -> str:
    task = client.view_task(taskid)
    if task.status not in (ChainTaskStatus.ACTIVE, ChainTaskStatus.REVEALING):
        return _not_active(task.status, "claim", want="ACTIVE or REVEALING")
    now = client.block_timestamp()
    if task.final_deadline > now:
        return f"the final deadline ({task.final_deadline}) has not been reached (now {now})"
    return ""


def reopen(client: ChainClient, sender: str, taskid: str) -> str:
    task = client.view_task(taskid)
    if task.status == ChainTaskStatus.UNSET:
        return f"task {taskid} is not initialized"
    deal = client.view_deal(task.dealid)
    if not _same(sender, deal.workerpool.owner):
        return f"only the scheduler ({deal.workerpool.owner}) may reopen; the sender is {sender}"
    now = client.block_timestamp()
    if task.status != ChainTaskStatus.REVEALING:
        return _not_active(task.status, "reopen", want="REVEALING")
    if task.final_deadline <= now:
        return "the final deadline passed"
    if task.reveal_deadline > now:
        return f"the reveal deadline ({task.reveal_deadline}) has not passed yet (now {now})"
    if task.reveal_counter != 0:
        return "a worker already revealed; finalize instead of reopening"
    return ""


def _not_active(status: ChainTaskStatus, action: str, want: str = "ACTIVE") -> str:
    hints = {
        ChainTaskStatus.UNSET: "the task is not initialized on chain",
        ChainTaskStatus.COMPLETED: "the task is already COMPLETED",
        ChainTaskStatus.FAILED: "the task was claimed (FAILED)",
        ChainTaskStatus.REVEALING: "consensus was already reached (REVEALING)",
        ChainTaskStatus.ACTIVE: "consensus has not been reached yet (ACTIVE)",
    }
    return f"cannot {action}: {hints[status]}; {action} needs {want}"
