"""The hot path of ingest: decode and check an event in one native pass (msgspec).

:class:`tuneloop.services.feedback.contract.FeedbackEvent` (pydantic) is the contract and the
authority. Validating every event through it costs tens of microseconds, more
than polling the event from Kafka; msgspec decodes and type-checks the same
shape in about a microsecond. The msgspec structs below mirror the contract and
are *stricter* (no type coercion), so an event they accept is one the contract
accepts, with the same values. An event they reject goes to the pydantic path,
which decides, and words the dead-letter reason. ``tests/unit/test_fastpath.py``
checks the two agree over many mutated events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from tuneloop.services.feedback.contract import FeedbackEvent

_RFC3339 = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$"
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_Text128 = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Text256 = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class FastMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class FastEvent(msgspec.Struct, forbid_unknown_fields=True):
    schema_version: Literal[1]
    # The canonical lowercase form only: it is what the contract's UUID prints as, so
    # the text can be stored as is; other spellings go to the contract to normalise.
    event_id: Annotated[str, msgspec.Meta(pattern=_UUID)]
    # Kept as text and parsed below: msgspec rounds sub-microsecond digits where the
    # contract truncates them, so only up to six fraction digits take this path.
    occurred_at: Annotated[str, msgspec.Meta(pattern=_RFC3339)]
    app: _Text128
    request_id: _Text256
    messages: Annotated[list[FastMessage], msgspec.Meta(min_length=1)]
    completion: str
    adapter_version: str | None = None
    rating: Annotated[float, msgspec.Meta(ge=-1, le=1)] | None = None
    correction: str | None = None
    label: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    language: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    user_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    metadata: dict[str, Any] = {}


_DECODER = msgspec.json.Decoder(FastEvent)
_FIELDS = set(FeedbackEvent.model_fields)
assert set(FastEvent.__struct_fields__) == _FIELDS, "FastEvent must mirror FeedbackEvent"


class DecodedEvent(NamedTuple):
    """A fast-path event with its timestamp parsed, shaped like FeedbackEvent for ``event_row``."""

    event_id: str
    occurred_at: datetime
    app: str
    request_id: str
    adapter_version: str | None
    messages: list[FastMessage]
    completion: str
    rating: float | None
    correction: str | None
    label: str | None
    language: str | None
    user_id: str | None
    metadata: dict[str, Any]


def fast_decode(raw: bytes) -> DecodedEvent | None:
    """The event if the fast path vouches for it, else None (let pydantic decide)."""
    try:
        e = _DECODER.decode(raw)
        occurred_at = datetime.fromisoformat(e.occurred_at)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
        return None
    if not any(m.role == "user" and m.content.strip() for m in e.messages):
        return None
    return DecodedEvent(
        e.event_id, occurred_at, e.app, e.request_id, e.adapter_version, e.messages, e.completion,
        e.rating, e.correction, e.label, e.language, e.user_id, e.metadata,
    )
