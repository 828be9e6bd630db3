"""Public datasets shipped with tuneloop, each in a folder with its licence and source.

- ``banking77``: customer-support queries labelled with one of 77 intents (CC BY 4.0).
- ``snips``: utterances to a JSON object of their slots, by intent, with a schema (CC0).
- ``sgd``: dialogue turns to the assistant's reply, by service, a 36,000-pair sample (CC BY-SA 4.0).
"""

from __future__ import annotations

from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def dataset_dir(name: str) -> Path:
    """The folder of a bundled dataset.

    Raises ``FileNotFoundError`` naming the datasets that are bundled when ``name`` is not one.
    """
    path = _ROOT / name
    if not (path / "LICENSE").is_file():
        bundled = sorted(p.name for p in _ROOT.iterdir() if (p / "LICENSE").is_file())
        raise FileNotFoundError(f"no bundled dataset {name!r}; bundled: {', '.join(bundled)}")
    return path
