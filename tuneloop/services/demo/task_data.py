"""Extraction and reply data in one layout, for the demos of ``json`` and ``text`` tasks.

A folder holds ``train.csv`` and ``test.csv`` with the columns ``text`` (what the user
says), ``target`` (the answer to learn: a JSON object for extraction, a reply for free
text) and a third column naming the group or groups a row belongs to (``intent``,
``services``: several are comma-separated), from which a demo draws its old and new
traffic. Bundled: ``snips`` (extraction, CC0) and ``sgd`` (replies, CC BY-SA 4.0), each
with its licence; any folder in the same layout works.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.data import dataset_dir

COLUMNS = ("text", "target")


@dataclass(frozen=True)
class Row:
    text: str
    target: str
    groups: tuple[str, ...]


def bundled(name: str) -> Path:
    """The folder of a bundled dataset (``snips``, ``sgd``); raises ``FileNotFoundError``."""
    return dataset_dir(name)


def load_rows(folder: Path, split: str) -> list[Row]:
    """The rows of ``folder/<split>.csv``.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` naming what is
    wrong when its columns are not ``text``, ``target`` and one group column.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    path = Path(folder) / f"{split}.csv"
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        others = [c for c in columns if c not in COLUMNS]
        if any(c not in columns for c in COLUMNS) or len(others) != 1:
            raise ValueError(f"{path}: columns {columns}; the layout is text, target and one "
                             "column naming each row's group (e.g. intent or services)")
        group = others[0]
        return [Row(r["text"].strip(), r["target"].strip(),
                    tuple(g.strip() for g in (r[group] or "").split(",") if g.strip()))
                for r in reader if r["text"].strip() and r["target"].strip()]


def group_sizes(rows: Iterable[Row]) -> Counter[str]:
    """How many rows each group has (a row of two groups counts in both)."""
    return Counter(g for r in rows for g in r.groups)


def derive_schema(targets: Sequence[str]) -> dict[str, Any]:
    """A JSON Schema every target satisfies: an object of the fields the targets use, each
    of the JSON types seen for it, and no others.

    For data that comes without a schema; a schema of the team's own is better, since it
    may say more (required fields, formats). Raises ``ValueError`` when a target is not a
    JSON object.
    """
    types: dict[str, set[str]] = {}
    items: dict[str, set[str]] = {}
    for target in targets:
        obj = json.loads(target)
        if not isinstance(obj, dict):
            raise ValueError(f"target {target[:80]!r} is not a JSON object")
        for key, value in obj.items():
            types.setdefault(key, set()).add(_json_type(value))
            if isinstance(value, list):
                items.setdefault(key, set()).update(_json_type(v) for v in value)
    properties: dict[str, Any] = {}
    for key in sorted(types):
        kinds = sorted(types[key])
        spec: dict[str, Any] = {"type": kinds[0] if len(kinds) == 1 else kinds}
        if key in items:
            inner = sorted(items[key])
            spec["items"] = {"type": inner[0] if len(inner) == 1 else inner}
        properties[key] = spec
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": properties, "additionalProperties": False}


# JSON Schema's type of each Python type json.loads makes (bool before int: a bool is an int).
_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"))


def _json_type(value: Any) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "null")
