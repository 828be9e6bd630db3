"""Runs the last worker left unfinished: marked Crashed, and the resumable ones run again.

The worker runs every flow run of its deployments as its own child process, and the
supervisor kills what is left of the worker's process group when it dies (see
``tuneloop.infra.supervisor``). So when a worker starts, a run of its deployments still Pending,
Running or Cancelling in Prefect has no process behind it: nothing else would ever
finish it, and it would hold the deployment's concurrency slot for good.

Each is set to Crashed (which frees the slot), with its subflows. Runs of ``RESUMED``
flows are created again from the same deployment with the same parameters: the retrain
keeps its run key, so it finds the dataset it curated, goes on from its last training
checkpoint and publishes one adapter; the canary resumes the live window it opened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

# Not under "flows": outside a flow run, Prefect cannot send these lines to the API.
log = logging.getLogger("tuneloop.worker")

RESUMED = frozenset({"retrain", "canary"})
RESUMED_TAG = "resumed"
UNFINISHED = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]


@dataclass(frozen=True)
class Recovered:
    flow_run: str  # the interrupted run's name
    flow: str
    resumed_as: str | None  # the new run's id, or None when it is not run again


def recover_interrupted(deployment_names: list[str]) -> list[Recovered]:
    """Crash the unfinished runs of ``deployment_names`` ("flow/deployment") and resubmit
    the resumable ones. Call before the worker starts serving."""
    with get_client(sync_client=True) as client:
        flows: dict[UUID, str] = {}
        for name in deployment_names:
            try:
                flows[client.read_deployment_by_name(name).id] = name.split("/")[0]
            except ObjectNotFound:
                continue  # never deployed yet: nothing can be left over
        if not flows:
            return []
        runs = client.read_flow_runs(flow_run_filter=_unfinished(
            deployment_id=FlowRunFilterDeploymentId(any_=list(flows))))
        return [_recover(client, run, flows[run.deployment_id]) for run in runs
                if run.deployment_id is not None]


def _unfinished(**fields: Any) -> FlowRunFilter:
    return FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED)),
                         **fields)


def _recover(client: SyncPrefectClient, run: FlowRun, flow: str) -> Recovered:
    resume = flow in RESUMED and run.state_type != StateType.CANCELLING
    message = ("the worker running it died; run again from where it stopped" if resume
               else "the worker running it died")
    _crash_subflows(client, run.id, message)
    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    new_id = None
    if resume:
        assert run.deployment_id is not None
        new = client.create_flow_run_from_deployment(
            run.deployment_id, parameters=dict(run.parameters),
            tags=[*run.tags, RESUMED_TAG], idempotency_key=f"resume-{run.id}")
        new_id = str(new.id)
    log.warning("flow run %s (%s) was interrupted by a worker crash: marked Crashed%s",
                run.name, flow, f", resumed as {new_id}" if new_id else "")
    return Recovered(run.name, flow, new_id)


def _crash_subflows(client: SyncPrefectClient, parent: UUID, message: str) -> None:
    for sub in client.read_flow_runs(flow_run_filter=_unfinished(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))):
        _crash_subflows(client, sub.id, message)
        client.set_flow_run_state(sub.id, Crashed(message=message), force=True)
