"""Random keys kept in files of their own: made once, by whichever process is first."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path


def key_file(path: Path) -> str:
    """The random key kept in ``path``, created (mode 0600) if it does not exist yet.

    Raises ``OSError`` when the file cannot be read or created.
    """
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile: read it once written
        for _ in range(50):
            if text := path.read_text().strip():
                return text
            time.sleep(0.02)
        raise OSError(f"{path} stays empty") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key
