"""What every CLI command shares: the settings loaded once, the console, the store."""

from __future__ import annotations

import typer
from rich.console import Console

from tuneloop.runtime.settings import Settings

console = Console()
err_console = Console(stderr=True)


def settings_of(ctx: typer.Context) -> Settings:
    """The settings the root callback loaded for this invocation."""
    root = ctx.find_root()
    assert isinstance(root.obj, Settings), "root callback did not load settings"
    return root.obj



def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error in red and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)
