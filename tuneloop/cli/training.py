"""``tuneloop train`` and ``tuneloop adapters list/show/promote/rollback/verify``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from tuneloop.cli.common import console, fail, settings_of
from tuneloop.services.store.database import Store

if TYPE_CHECKING:
    from tuneloop.services.registry.core import Transition

adapters_app = typer.Typer(help="The adapter registry: versions, states, deployments.",
                           no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``train``, ``retrain`` and the ``adapters`` group to ``app``."""
    app.command("train")(train)
    app.command("retrain")(retrain)
    app.add_typer(adapters_app, name="adapters")


def train(
    ctx: typer.Context,
    dataset: str = typer.Option(..., "--dataset", help="Dataset version to train on."),
    config: str | None = typer.Option(
        None, "--config", "-c", help="Recipe config (YAML/TOML); default: training.config."
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Override max_steps."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help="Override."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override."),
    rank: int | None = typer.Option(None, "--rank", help="Override the LoRA rank."),
    run_key: str | None = typer.Option(
        None, "--run-key", help="Idempotency key; default: dataset + config + base model."),
) -> None:
    """Train a LoRA adapter on a dataset version and publish it as a candidate."""
    from botocore.exceptions import BotoCoreError, ClientError

    from tuneloop.flows.retrain import train_adapter
    from tuneloop.services.store.snapshots import SnapshotError
    from tuneloop.training.config import ConfigError
    from tuneloop.training.dataset import DatasetNotFoundError
    from tuneloop.training.pipeline import default_run_key, recipe_config
    from tuneloop.training.run_store import RunStoreError

    settings = settings_of(ctx)
    recipe = {"max_steps": max_steps, "learning_rate": learning_rate,
              "batch_size": batch_size, "rank": rank}
    try:
        cfg = recipe_config(settings.training, Path(config) if config else None, **recipe)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    key = run_key or default_run_key(dataset, cfg, settings.training.base_model)
    try:
        # The same flow the loop runs (from zeros: a person training by hand picks the data).
        # It loads the settings itself: the root callback put its flags in the environment.
        result = train_adapter(dataset, key, config_file=config, recipe_overrides=recipe,
                               show_progress=True)
    except (DatasetNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    except (BotoCoreError, ClientError) as exc:
        # The dataset's snapshot, checkpoints or the adapter upload (store.snapshots,
        # store.artifacts).
        raise fail(f"the object store at {settings.object_store.endpoint}: {exc}") from None
    except (RunStoreError, SnapshotError) as exc:  # each names what it found wrong
        raise fail(str(exc)) from None
    if result.get("unchanged"):  # a run continued from an adapter that kept its weights
        raise fail(result["unchanged"])
    with Store.of(settings).connect() as con:
        from tuneloop.services.registry.store import get_adapter

        adapter = get_adapter(con, result["version"])
    golden = adapter.metrics.get("golden", {}).get("accuracy")
    base = adapter.metrics.get("base_golden", {}).get("accuracy")
    training = adapter.metrics.get("training", {})
    console.print(
        f"adapter [bold]{adapter.version}[/] ({adapter.name}) is a {adapter.state}: val loss "
        f"{training.get('initial_val_loss', float('nan')):.4f} -> "
        f"{training.get('best_val_loss', float('nan')):.4f}, golden accuracy "
        f"{_pct(base)} (base) -> {_pct(golden)}; {adapter.where(settings.adapters_dir)}"
    )


def retrain(
    ctx: typer.Context,
    reason: str = typer.Option("manual", "--reason", help="Why, for the decision log."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="Train on this version instead of curating a new one."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Override max_steps."),
    no_canary: bool = typer.Option(
        False, "--no-canary", help="Only publish the candidate; do not start the canary."),
) -> None:
    """The loop's retrain, now: curate, train from production's adapter, publish, canary.

    The same flow a drift alarm starts; without ``--no-canary`` the new candidate's
    ``tuneloop.adapter.published`` event starts the canary on the worker.
    """
    from tuneloop.flows.retrain import retrain as retrain_flow

    # The flow loads the settings itself: the root callback put its flags in the environment.
    overrides = {"loop.canary_new_candidates": False} if no_canary else None
    try:
        result = retrain_flow(reason=f"manual: {reason}", dataset_version=dataset,
                              max_steps=max_steps, overrides=overrides)
    except (LookupError, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"dataset [bold]{result['dataset_version']}[/] -> adapter "
                  f"[bold]{result['name']}[/] ({result['state']})"
                  + ("" if no_canary or result["state"] != "candidate" else
                     "; the canary starts on the worker (`tuneloop decisions` shows its verdict)"))


@adapters_app.command("list")
def list_cmd(ctx: typer.Context) -> None:
    """Every adapter version with its state and headline metrics."""
    from tuneloop.services.registry.store import list_adapters

    with Store.of(settings_of(ctx)).connect() as con:
        rows = list_adapters(con)
    table = Table()
    for column in ("version", "name", "state", "dataset", "val loss", "golden acc"):
        table.add_column(column, no_wrap=True)
    for a in rows:
        table.add_row(a.version, a.name, a.state, a.dataset_version or "-",
                      _num(a.metrics.get("training", {}).get("best_val_loss")),
                      _pct(a.metrics.get("golden", {}).get("accuracy")))
    console.print(table)


@adapters_app.command("show")
def show_cmd(ctx: typer.Context, version: str = typer.Argument(...)) -> None:
    """An adapter's record, manifest and deployment history."""
    from tuneloop.services.registry.core import RegistryError
    from tuneloop.services.registry.remote import local_files
    from tuneloop.services.registry.store import get_adapter, history

    settings = settings_of(ctx)
    with Store.of(settings).connect() as con:
        try:
            adapter = get_adapter(con, version)
        except RegistryError as exc:
            raise fail(str(exc)) from None
        moves = history(con, version)
    try:
        manifest = json.loads((local_files(adapter, settings) / "manifest.json").read_text())
    except (OSError, RegistryError):  # gone, altered or unreachable: `adapters verify` says which
        manifest = {}
    console.print_json(json.dumps({
        "version": adapter.version, "name": adapter.name, "state": adapter.state,
        "path": adapter.where(settings.adapters_dir), "base_model": adapter.base_model,
        "dataset": adapter.dataset_version,
        "manifest_sha256": adapter.sha256, "hyperparameters": manifest.get("hyperparameters"),
        "metrics": adapter.metrics, "timings": manifest.get("timings"),
        "deployments": moves,
    }, default=str))


@adapters_app.command("promote")
def promote_cmd(
    ctx: typer.Context,
    version: str = typer.Argument(...),
    to: str = typer.Option("production", "--to", help="'canary' or 'production'."),
    reason: str = typer.Option(..., "--reason", help="Why; recorded in deployments."),
) -> None:
    """Move an adapter to canary or production (the old production is retired).

    With the gateway running, the version is loaded and probed on every vLLM replica
    and the alias flipped before the registry records the move.
    """
    from tuneloop.serving.control import promote

    with console.status(f"loading and probing {version} on every replica..."):
        _change(lambda: promote(settings_of(ctx), version, to, reason))


@adapters_app.command("rollback")
def rollback_cmd(
    ctx: typer.Context,
    reason: str = typer.Option(..., "--reason", help="Why; recorded in deployments."),
    to: str | None = typer.Option(None, "--to", help="Retired version to restore."),
) -> None:
    """Reject the production adapter and restore the previous one (or the base model)."""
    from tuneloop.serving.control import rollback

    plan = _change(lambda: rollback(settings_of(ctx), reason, to))
    if len(plan) == 1:
        console.print("no retired adapter to restore: the alias now serves the base model")


@adapters_app.command("reject")
def reject_cmd(
    ctx: typer.Context,
    version: str = typer.Argument(...),
    reason: str = typer.Option(..., "--reason", help="Why; recorded in deployments."),
) -> None:
    """Reject a candidate or the canary (a canary stops taking traffic first)."""
    from tuneloop.serving.control import reject

    _change(lambda: reject(settings_of(ctx), version, reason))


def _change(apply: Callable[[], list[Transition]]) -> list[Transition]:
    """Run a registry + gateway change, print its moves; a refusal exits with its reason."""
    from tuneloop.services.registry.core import RegistryError
    from tuneloop.serving.control import GatewayError

    try:
        plan = apply()
    except (RegistryError, GatewayError, OSError) as exc:  # OSError: its files are gone
        raise fail(str(exc)) from None
    for step in plan:
        console.print(f"{step.version}: {step.from_state} -> [bold]{step.to_state}[/]")
    return plan


@adapters_app.command("collect")
def collect_cmd(ctx: typer.Context, dry_run: bool = typer.Option(
        False, "--dry-run", help="List what would be collected; delete nothing.")) -> None:
    """Delete the object-stored files of rejected versions and of retired ones past each
    alias's newest store.keep_retired (what each promotion does on its own)."""
    from tuneloop.services.registry.remote import RemoteAdapters
    from tuneloop.services.registry.store import collect

    settings = settings_of(ctx)
    if not settings.store.artifacts:
        raise fail("adapters live in the registry directory (store.artifacts is false): "
                   "nothing is collected there")
    try:
        with Store.of(settings).connect() as con:
            gone = collect(con, RemoteAdapters.of(settings), settings.store.keep_retired,
                           dry_run=dry_run)
    except Exception as exc:  # noqa: BLE001 - the object store or the store is down
        raise fail(f"cannot collect: {exc}") from None
    verb = "would collect" if dry_run else "collected"
    for adapter in gone:
        console.print(f"{verb} {adapter.version} ({adapter.state}): {adapter.path}")
    console.print(f"{len(gone)} version(s) {verb}; each alias keeps its newest "
                  f"{settings.store.keep_retired} retired")


@adapters_app.command("verify")
def verify_cmd(ctx: typer.Context, version: str | None = typer.Argument(
        None, help="One version; default: all.")) -> None:
    """Check every file of an adapter against its manifest and the registry."""
    from tuneloop.services.registry.core import RegistryError
    from tuneloop.services.registry.remote import local_files
    from tuneloop.services.registry.store import get_adapter, list_adapters

    settings = settings_of(ctx)
    with Store.of(settings).connect() as con:
        try:
            adapters = [get_adapter(con, version)] if version else list_adapters(con)
        except RegistryError as exc:
            raise fail(str(exc)) from None
    bad = 0
    for adapter in adapters:
        try:
            directory = local_files(adapter, settings)
            files = len(json.loads((directory / "manifest.json").read_text())["files"])
            console.print(f"[green]ok[/] {adapter.version}: {files} files verified")
        except (RegistryError, FileNotFoundError) as exc:  # altered, gone, or unreachable
            if isinstance(exc, FileNotFoundError) and adapter.state in ("rejected", "retired"):
                # Collected on purpose (store.keep_retired, `tuneloop adapters collect`).
                console.print(f"[dim]collected[/] {adapter.version} ({adapter.state}): {exc}")
                continue
            bad += 1
            console.print(f"[red]FAILED[/] {adapter.version}: {exc}")
    if bad:
        raise typer.Exit(1)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
