"""Logging set-up: rich on the terminal, plain lines with timestamps in a file.

Modules log with ``logging.getLogger(__name__)`` and put the ids they act on
(event, run, adapter version) into each message.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.logging import RichHandler

_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s"


def setup_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Idempotent: a second call only adjusts the level."""
    root = logging.getLogger()
    root.setLevel(level)
    if getattr(root, "_tuneloop_configured", False):
        return
    console = RichHandler(show_path=False, rich_tracebacks=True, markup=False)
    console.setLevel(level)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        root.addHandler(handler)
    for noisy in ("kafka", "httpx", "urllib3", "prefect", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    root._tuneloop_configured = True  # type: ignore[attr-defined]
