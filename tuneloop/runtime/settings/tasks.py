"""What a served alias is asked to do: its task spec (``[tasks.<alias>]`` in the file).

Three kinds of task, each learned and judged in its own way:

- ``label``: the answer names a class (intent routing); judged by macro-F1.
- ``json``: the answer is a JSON object that a JSON Schema file describes (structured
  extraction); judged by parse and schema-valid rates and exact match per field.
- ``text``: the answer is free text (a support bot's reply); judged against the reference
  by chrF and ROUGE-L, and side by side by a judge model when one is configured.

A spec is checked when settings load: an unknown kind, a ``json`` task without a
readable, valid schema, or a schema on another kind is an error that names the fix.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tuneloop.runtime.settings.sections import Section

TaskKind = Literal["label", "json", "text"]
KINDS: tuple[str, ...] = ("label", "json", "text")
# Answer budgets when a spec names none: a label is a few tokens; an object of slots and
# a reply are sentences.
DEFAULT_ANSWER_TOKENS = {"label": 16, "json": 128, "text": 96}


class TaskSpec(Section):
    """One served alias's task."""

    kind: TaskKind = Field(
        "label", description="label (a class name), json (an object its schema describes) "
        "or text (a free-text answer).")
    system_prompt: str | None = Field(
        None, description="The system turn of the task: curation puts it first in every "
        "example whose chat has none, and the gateway in every request without one. None: "
        "the apps send their own.")
    answer_tokens: int | None = Field(
        None, ge=1, le=4096, description="Answer budget of the offline gate, the nightly "
        "check and the training report; default by kind: label 16, json 128, text 96.")
    json_schema: Path | None = Field(
        None, description="json only: the JSON Schema file (draft 2020-12 unless it names "
        "its own $schema) a target and an answer must satisfy. A relative path is read "
        "beside the settings file when it is there, else from the working directory.")
    decode_with_schema: bool = Field(
        True, description="json only: the gateway has vLLM decode every chat answer under "
        "the schema (structured outputs, response_format json_schema), so an answer that "
        "ends within the budget is valid; a request that constrains the answer itself "
        "(response_format, tools to call, vLLM's structured_outputs or guided_*) keeps its "
        "own.")
    target_min_rating: float = Field(
        0.5, gt=0, le=1, description="text and json: an answer rated at least this (with no "
        "correction) is a training target; an answer rated lower never is.")

    @field_validator("json_schema")
    @classmethod
    def _beside_settings_file(cls, path: Path | None) -> Path | None:
        """A relative path names a file beside the settings file that names it, as an
        operator writes it; the working directory is the fallback (settings given by the
        environment or in code)."""
        if path is None or path.is_absolute():
            return path
        from tuneloop.runtime.settings.loader import CONFIG_ENV, DEFAULT_CONFIG_FILE

        beside = Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE)).parent / path
        return beside.resolve() if beside.is_file() else path

    @model_validator(mode="after")
    def _check_schema(self) -> TaskSpec:
        if self.kind != "json" and self.json_schema is not None:
            raise ValueError(
                f"json_schema={self.json_schema} is set on a task of kind {self.kind!r}: only a "
                "json task has a schema; remove it or set kind = \"json\"")
        if self.kind == "json":
            if self.json_schema is None:
                raise ValueError(
                    "a json task needs json_schema: the path of a JSON Schema file describing "
                    "the answer object (e.g. json_schema = \"slots.schema.json\")")
            self.schema_document  # noqa: B018 - read and checked now, not at first use
        return self

    @property
    def max_answer_tokens(self) -> int:
        return self.answer_tokens or DEFAULT_ANSWER_TOKENS[self.kind]

    @cached_property
    def schema_document(self) -> dict[str, Any] | None:
        """The JSON Schema of a json task (None for other kinds), read and checked once.

        Raises ``ValueError`` naming the file when it cannot be read, is not JSON, or is
        not a valid schema.
        """
        if self.json_schema is None:
            return None
        return load_schema(self.json_schema)

    def response_format(self) -> dict[str, Any] | None:
        """The OpenAI ``response_format`` the gateway adds to a json alias's chat requests
        (:attr:`decode_with_schema`); None for other kinds or when it is off."""
        if self.kind != "json" or not self.decode_with_schema:
            return None
        return {"type": "json_schema",
                "json_schema": {"name": "answer", "schema": self.schema_document}}

    def describe(self) -> dict[str, Any]:
        """The spec as written into manifests and shown by ``tuneloop status``."""
        return {"kind": self.kind, "system_prompt": self.system_prompt,
                "answer_tokens": self.max_answer_tokens,
                "json_schema": str(self.json_schema) if self.json_schema else None,
                "schema": self.schema_document,
                "decode_with_schema": self.response_format() is not None,
                "target_min_rating": self.target_min_rating}


def load_schema(path: Path) -> dict[str, Any]:
    """The JSON Schema in ``path``, checked against its metaschema.

    Raises ``ValueError`` naming the file and the fix when it is missing, not JSON, not an
    object, or not a valid schema.
    """
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"json_schema {path}: cannot read it ({exc.strerror or exc}); give "
                         "the path of a JSON Schema file (relative to the settings file's "
                         f"folder or to the working directory, {Path.cwd()})") from None
    except ValueError as exc:
        raise ValueError(f"json_schema {path} is not JSON ({exc}); fix the file") from None
    if not isinstance(document, dict):
        raise ValueError(f"json_schema {path} holds a {type(document).__name__}, not a JSON "
                         "Schema object")
    try:
        validator_for(document).check_schema(document)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        raise ValueError(f"json_schema {path} is not a valid JSON Schema at {where}: "
                         f"{exc.message}") from None
    return document
