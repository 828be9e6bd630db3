"""Logging set-up: rich on the terminal (standard error: standard output is each command's
own output, such as ``tuneloop status --json``), plain lines with timestamps in a file.

Modules log with ``logging.getLogger(__name__)`` and put the ids they act on
(event, run, adapter version) into each message.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s"
# Libraries that log every request at INFO; the terminal shows their warnings only, even
# after another library (Prefect's logging set-up) resets their levels.
NOISY = ("kafka", "httpx", "urllib3", "prefect", "sentence_transformers", "openai")


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(NOISY)


def setup_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Idempotent: a second call only adjusts the level."""
    root = logging.getLogger()
    root.setLevel(level)
    if getattr(root, "_tuneloop_configured", False):
        return
    console = RichHandler(console=Console(stderr=True), show_path=False,
                          rich_tracebacks=True, markup=False)
    console.setLevel(level)
    if logging.getLevelName(level) > logging.DEBUG:
        console.addFilter(_QuietLibraries())
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        root.addHandler(handler)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    root._tuneloop_configured = True  # type: ignore[attr-defined]
