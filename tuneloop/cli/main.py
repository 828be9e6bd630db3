"""The ``tuneloop`` command: one entry point, settings loaded once, commands by area."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import typer
from pydantic import ValidationError

from tuneloop.cli.common import fail
from tuneloop.infra.prefect_server import prefect_env
from tuneloop.runtime.logs import setup_logging
from tuneloop.runtime.settings import SettingsError, load_settings

app = typer.Typer(
    name="tuneloop",
    help="Continuous LoRA retraining from production feedback.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Each module defines ``register(app)`` and owns the commands of one area.
COMMAND_MODULES = (
    "tuneloop.cli.stack",
    "tuneloop.cli.serving",
    "tuneloop.cli.feedback",
    "tuneloop.cli.deadletters",
    "tuneloop.cli.data",
    "tuneloop.cli.training",
    "tuneloop.cli.canary",
    "tuneloop.cli.bench",
    "tuneloop.cli.demo",
)


@app.callback()
def root(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="TOML settings file."),
    home: Path | None = typer.Option(None, "--home", help="State directory (settings: home)."),
    bootstrap_servers: str | None = typer.Option(
        None, "--bootstrap-servers", help="Kafka brokers (settings: kafka.bootstrap_servers)."
    ),
    log_level: str | None = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Load settings once: file, then environment, then these flags."""
    if config is not None:
        if not config.exists():
            raise fail(f"--config {config}: no such file")
        os.environ["TUNELOOP_CONFIG"] = str(config)
    try:
        settings = load_settings(
            {"home": home, "kafka.bootstrap_servers": bootstrap_servers, "log_level": log_level}
        )
    except (ValidationError, SettingsError) as exc:
        raise fail(f"invalid settings:\n{exc}") from None
    setup_logging(settings.log_level, settings.home / "logs" / "tuneloop.log")
    # Flows load the settings themselves (a deployment run has no CLI flags), so the
    # flags travel to them, and to any process started from here, as environment.
    for env_name, value in (("TUNELOOP_HOME", home), ("TUNELOOP_KAFKA__BOOTSTRAP_SERVERS",
                                                       bootstrap_servers),
                            ("TUNELOOP_LOG_LEVEL", log_level)):
        if value is not None:
            os.environ[env_name] = str(value)
    # Prefect reads its own settings from the environment: point it at tuneloop's
    # server before any flow module is imported.
    for key, value in prefect_env(settings).items():
        os.environ[key] = value
    ctx.obj = settings


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """The ``tuneloop`` console script: exit 3, with the holder named, on a busy store."""
    from tuneloop.services.store.database import StoreBusyError

    try:
        app()
    except StoreBusyError as exc:
        # A busy store is an answer for the user, not a crash: say who holds it.
        from tuneloop.cli.common import err_console

        err_console.print(f"[bold red]store busy:[/] {exc}")
        raise SystemExit(3) from None


if __name__ == "__main__":
    main()
