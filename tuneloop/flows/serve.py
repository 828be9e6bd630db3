"""Serve tuneloop's deployments from one long-running process (``tuneloop worker``).

The loop, with Prefect's own triggers, concurrency limits and schedules:

- ``detect_drift/scheduled`` checks the current window every ``drift.interval_s``; on
  drift it emits ``tuneloop.drift.detected``, and ``tuneloop.labels.accumulated`` once
  enough new labels arrived.
- ``retrain/loop`` runs on either event (a deployment trigger), on
  ``loop.retrain_schedule`` if set, or by hand (``tuneloop retrain``). One at a time: a
  run that finds another running is cancelled (the deployment's concurrency limit), and
  the flow itself skips within the cool-down. It ends by emitting
  ``tuneloop.adapter.published``.
- ``canary/loop`` runs on that event (or by hand) for the new candidate, one at a time,
  queued.
- ``check-production/nightly`` scores production on the golden set on
  ``canary.freeze_schedule`` and freezes promotions when it fell.
- ``curate/manual`` for a dataset version by hand.
- With ``loop.train_work_pool`` set, ``train-adapter/<pool>`` is registered on that work
  pool for a ``prefect worker`` on a GPU machine; the retrain flow runs training there.

The worker runs under a supervisor that restarts it; on start it marks the runs its
predecessor left unfinished Crashed and runs the retrain and canary ones again, which go
on from where they stopped (``tuneloop.flows.recovery``).

Ingest is not a deployment: ``tuneloop up`` runs one long-running consumer.

Beyond one machine, ``prefect.yaml`` at the repository root declares these same
deployments on work pools (docs/production.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger

from tuneloop.flows.canary import canary, check_production
from tuneloop.flows.curate import curate_flow
from tuneloop.flows.drift import DRIFT_EVENT, LABELS_EVENT, detect_drift_flow
from tuneloop.flows.recovery import recover_interrupted
from tuneloop.flows.retrain import PUBLISHED_EVENT, retrain, train_adapter
from tuneloop.runtime.settings import Settings


def retrain_triggers(settings: Settings) -> list[DeploymentEventTrigger]:
    """What starts a retrain on its own: drift alarms and accumulated labels."""
    expect = set()
    if settings.loop.retrain_on_drift:
        expect.add(DRIFT_EVENT)
    if settings.loop.retrain_min_new_labels:
        expect.add(LABELS_EVENT)
    if not expect:
        return []
    return [DeploymentEventTrigger(
        name="retrain on drift or new labels", expect=expect,
        # A template that is the whole value renders to the native type: the event id
        # (a UUID) goes through `string` to reach the flow as text.
        parameters={"reason": "{{ event.event }}", "trigger_id": "{{ event.id | string }}"},
    )]


def deployments(settings: Settings) -> list[Any]:
    loop = settings.loop
    canary_triggers = [DeploymentEventTrigger(
        name="canary for a new candidate", expect={PUBLISHED_EVENT},
        parameters={"candidate": "{{ event.payload.version }}"},
    )] if loop.canary_new_candidates else []
    retrain_schedules = [CronSchedule(cron=loop.retrain_schedule)] if loop.retrain_schedule else None
    return [
        detect_drift_flow.to_deployment(
            name="scheduled", interval=settings.drift.interval_s, concurrency_limit=1,
            description="Compare the current window with the reference; emit on drift.",
            tags=["tuneloop", "drift"],
        ),
        retrain.to_deployment(
            name="loop", triggers=retrain_triggers(settings),  # type: ignore[arg-type]
            schedules=retrain_schedules,
            parameters={"reason": "schedule", "automatic": True} if retrain_schedules else None,
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
            tags=["tuneloop", "training"],
            description="Curate, train from production's adapter, publish a candidate, hand "
                        "it to the canary.",
        ),
        canary.to_deployment(
            name="loop", triggers=canary_triggers,  # type: ignore[arg-type]
            concurrency_limit=1, tags=["tuneloop", "canary"],
            description="Gate a candidate adapter offline, then live; promote or roll back.",
        ),
        curate_flow.to_deployment(
            name="manual", concurrency_limit=1, tags=["tuneloop", "curation"],
            description="Curate a new immutable dataset version from feedback.",
        ),
        check_production.to_deployment(
            name="nightly", cron=settings.canary.freeze_schedule, concurrency_limit=1,
            tags=["tuneloop", "canary"],
            description="Production on the golden set; freeze promotions below the threshold.",
        ),
    ]


def training_deployment(settings: Settings) -> RunnerDeployment | None:
    """``train-adapter/<pool>`` for ``loop.train_work_pool``; None when training runs in
    the worker."""
    pool = settings.loop.train_work_pool
    if not pool:
        return None
    # By module path: the pool's machine imports the flow from its own tuneloop install,
    # from whatever directory its worker runs in.
    deployment = train_adapter.to_deployment(
        name=pool, tags=["tuneloop", "training"], entrypoint_type=EntrypointType.MODULE_PATH,
        description="Train and publish one adapter (run by the retrain flow).",
    )
    assert not asyncio.iscoroutine(deployment)
    # Its runs send heartbeats, for ZOMBIE_AUTOMATION.
    deployment.job_variables = {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}}
    return deployment


def register_training_pool(settings: Settings) -> None:
    """``train-adapter/<pool>`` on ``loop.train_work_pool``, for a worker on another
    machine. Its runs send heartbeats, and the automation :data:`ZOMBIE_AUTOMATION` marks
    a run whose heartbeats stop (its machine died) Crashed, so that the retrain waiting
    on it submits it again (``tuneloop.flows.retrain``)."""
    deployment = training_deployment(settings)
    if deployment is None:
        return
    deployment_id = deployment.apply(work_pool_name=settings.loop.train_work_pool)
    assert not asyncio.iscoroutine(deployment_id)
    ensure_zombie_automation(deployment_id)


# Prefect's own recipe for runs whose machine died ("detect zombie flows"): a run that
# sent a heartbeat and then neither another one nor a final state within the window is
# set Crashed. Only the training deployment's runs match: the control worker's runs are
# recovered by the worker itself (tuneloop.flows.recovery), and a bucket for each of
# their heartbeats would be writes on the Prefect server's database for nothing.
ZOMBIE_AUTOMATION = "tuneloop: crash runs whose heartbeats stopped"
HEARTBEAT_S = 30  # Prefect's least
ZOMBIE_AFTER_S = 3 * HEARTBEAT_S


def ensure_training_automation(settings: Settings) -> None:
    """:func:`ensure_zombie_automation` for ``train-adapter/<loop.train_work_pool>`` as the
    server has it (deployed from prefect.yaml on a cluster)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(
            f"train-adapter/{settings.loop.train_work_pool}")
    ensure_zombie_automation(deployment.id)


def ensure_zombie_automation(deployment_id: Any) -> None:
    """Create :data:`ZOMBIE_AUTOMATION` for the runs of the deployment ``deployment_id``
    unless the server has it for that deployment; one left for an earlier deployment (the
    pool renamed, the deployment made again) is replaced."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.exceptions import ObjectNotFound

    try:
        found = Automation.read(name=ZOMBIE_AUTOMATION)
        assert not asyncio.iscoroutine(found)
        if str(deployment_id) in found.trigger.model_dump_json():
            return
        found.delete()
    except (ObjectNotFound, ValueError):
        pass
    created = Automation(
        name=ZOMBIE_AUTOMATION,
        description="A training run on a work pool whose machine died is marked Crashed, "
                    "and the retrain waiting on it submits it again; it resumes from its "
                    "checkpoint.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({
                "prefect.resource.id": [f"prefect.deployment.{deployment_id}"],
                "prefect.resource.role": "deployment"}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_S)),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {ZOMBIE_AFTER_S} s: its machine or worker died")],
    ).create()
    assert not asyncio.iscoroutine(created)


def serve_all(settings: Settings) -> None:
    """Block, running triggered, scheduled and manual runs of every deployment; first
    resume what a previous worker left unfinished (``tuneloop.flows.recovery``)."""
    register_training_pool(settings)
    served = deployments(settings)
    recover_interrupted([f"{d.flow_name}/{d.name}" for d in served])
    serve(*served, limit=3)
