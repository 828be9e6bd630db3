"""``tuneloop bench NAME``: run ``tuneloop/bench/NAME.py``, which prints ``FIGURE name=value`` lines."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import typer

from tuneloop import bench
from tuneloop.cli.common import fail, settings_of


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        ctx: typer.Context,
        name: str = typer.Argument(..., help="Benchmark to run: " + ", ".join(available())),
        quick: bool = typer.Option(False, "--quick", help="Smaller sizes, for a smoke run."),
        task: str | None = typer.Option(
            None, "--task", help="The kind of task (label, json, text), for benchmarks that "
            "run per kind (canary)."),
        store: str | None = typer.Option(
            None, "--store", help="The operational store (duckdb, postgres), for benchmarks "
            "that run on either (ingest)."),
        data: Path | None = typer.Option(
            None, "--data", help="A task-data folder (train.csv, test.csv: text, target, "
            "group), for benchmarks that run per kind (canary --task json|text; default the "
            "bundled SNIPS or SGD)."),
        seed: int | None = typer.Option(
            None, "--seed", help="Which groups the benchmark draws as old and new, for "
            "benchmarks that run per kind (canary --task json|text; default 0)."),
    ) -> None:
        """Run a benchmark against its baseline, in one run; ends with FIGURE lines."""
        if name not in available():
            raise fail(f"no benchmark {name!r}; choose from {', '.join(available())}")
        module = importlib.import_module(f"tuneloop.bench.{name}")
        extra: dict[str, object] = {}
        if task is not None:
            if "task" not in inspect.signature(module.main).parameters:
                raise fail(f"bench {name} runs one kind of task; leave out --task")
            if task not in ("label", "json", "text"):
                raise fail(f"--task {task!r}: use label, json or text")
            extra["task"] = task
        if store is not None:
            if "store" not in inspect.signature(module.main).parameters:
                raise fail(f"bench {name} has one store; leave out --store")
            if store not in ("duckdb", "postgres"):
                raise fail(f"--store {store!r}: use duckdb or postgres")
            extra["store"] = store
        for option, value in (("data", data), ("seed", seed)):
            if value is None:
                continue
            if option not in inspect.signature(module.main).parameters or task in (None, "label"):
                raise fail(f"--{option} is for bench canary --task json|text")
            extra[option] = value
        module.main(settings_of(ctx), quick=quick, **extra)
