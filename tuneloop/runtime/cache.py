"""The user's cache folder for what tuneloop builds once per machine and shares across homes.

A converted base model and an exported embedding model depend only on the files they were
made from (each is named by their hash), so every tuneloop home on a machine can share
them: a demo that wipes its home does not convert the base model again.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def user_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/tuneloop/<name>`` (default ``~/.cache/tuneloop/<name>``), created;
    a folder under the temporary directory where the home's cache is not writable."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuneloop" / name
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "tuneloop-cache" / name
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback
