"""``tuneloop bench NAME``: run ``tuneloop/bench/NAME.py``, which prints ``FIGURE name=value`` lines."""

from __future__ import annotations

import importlib
import pkgutil

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
    ) -> None:
        """Run a benchmark against its baseline, in one run; ends with FIGURE lines."""
        if name not in available():
            raise fail(f"no benchmark {name!r}; choose from {', '.join(available())}")
        module = importlib.import_module(f"tuneloop.bench.{name}")
        module.main(settings_of(ctx), quick=quick)
