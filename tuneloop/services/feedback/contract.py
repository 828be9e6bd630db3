"""Feedback event contract v1: what apps send, and how it is checked.

An event travels as UTF-8 JSON on topic ``feedback.v1`` with key ``event_id``.
:func:`parse_event` is the single gate: it checks the size cap *before* parsing
(a 50 MB payload is never decoded), then the schema, and raises
:class:`InvalidEvent` whose ``reason`` is what the dead-letter row records.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
SCHEMA_FILE = Path(__file__).parent / "schemas" / "feedback.v1.json"


class InvalidEvent(ValueError):
    """An event that cannot be accepted; ``reason`` is short and names the field."""

    retriable = False

    def __init__(self, reason: str, event_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_id = event_id


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class FeedbackEvent(BaseModel):
    """Feedback on one answer the served model gave."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(description="Always 1 for this contract.")
    event_id: uuid.UUID = Field(description="Idempotency key; a resend with the same id is a no-op.")
    occurred_at: datetime = Field(description="RFC 3339 time of the answer, with a timezone.")
    app: str = Field(min_length=1, max_length=128, description="The served alias, e.g. support-bot.")
    request_id: str = Field(min_length=1, max_length=256)
    adapter_version: str | None = Field(None, description="What answered; null for the base model.")
    messages: list[Message] = Field(min_length=1, description="The chat the model answered.")
    completion: str = Field(description="The model's answer.")
    rating: float | None = Field(None, ge=-1, le=1, description="-1 (bad) .. 1 (good).")
    correction: str | None = Field(None, description="The ideal answer, from a human.")
    label: str | None = Field(None, max_length=256, description="Task label, e.g. an intent.")
    language: str | None = Field(None, max_length=32)
    user_id: str | None = Field(None, max_length=128, description="Hashed, never raw.")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _needs_timezone(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at needs a timezone offset, e.g. 2026-01-01T12:00:00Z")
        return value

    @model_validator(mode="after")
    def _needs_user_turn(self) -> FeedbackEvent:
        if not any(m.role == "user" and m.content.strip() for m in self.messages):
            raise ValueError("messages needs at least one non-empty user turn")
        return self

    @property
    def user_text(self) -> str:
        """The last user turn: what drift and curation look at."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item["loc"]) or "event"
        parts.append(f"{where}: {item['msg']}")
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def parse_event(raw: bytes, max_bytes: int = MAX_EVENT_BYTES) -> FeedbackEvent:
    """Decode and validate one event.

    Raises :class:`InvalidEvent` for oversize, non-UTF-8, non-JSON or
    schema-violating payloads; the reason names the problem.
    """
    if len(raw) > max_bytes:
        raise InvalidEvent(f"event is {len(raw)} bytes, over the {max_bytes}-byte cap")
    try:
        # Fast path: pydantic-core parses and validates in one pass. Only a failure
        # takes the slow path below, which words the reason for the dead letter.
        return FeedbackEvent.model_validate_json(raw)
    except ValidationError:
        pass
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"event must be a JSON object, got {type(data).__name__}")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    if data.get("schema_version") != SCHEMA_VERSION:
        raise InvalidEvent(
            f"schema_version={data.get('schema_version')!r}: this consumer reads version 1",
            event_id,
        )
    try:
        return FeedbackEvent.model_validate(data)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc), event_id) from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema app developers validate against (``schemas/feedback.v1.json`` beside
    this module, which a unit test keeps equal to it)."""
    schema = FeedbackEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://tuneloop.dev/schemas/feedback.v1.json"
    schema["description"] = (
        "tuneloop feedback event v1. JSON on topic feedback.v1, key = event_id, "
        f"at most {MAX_EVENT_BYTES} bytes."
    )
    return schema

