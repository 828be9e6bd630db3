"""Ingest's pure core: validated, redacted feedback rows and dead letters, ready to land.

:func:`prepare_batch` turns raw Kafka records into rows and dead letters (a record that
cannot be stored, say with a lone UTF-16 surrogate, is a dead letter too); nothing here
touches the store. :mod:`tuneloop.services.ingest.store` lands a prepared batch, exactly
once per key, and the consumer loop in :mod:`tuneloop.services.ingest.consumer` commits
Kafka offsets only after that write has returned.

A batch names its :class:`KeyedTable`, so the same write and dead letters serve every
topic ingest lands (:mod:`tuneloop.services.ingest.shadow` lands the gateway's shadow
pairs through them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property

import duckdb
import msgspec
import pyarrow as pa

from tuneloop.services.evaluation.tasks import parse_object
from tuneloop.services.feedback.contract import (
    MAX_EVENT_BYTES,
    FeedbackEvent,
    InvalidEvent,
    Message,
    parse_event,
)
from tuneloop.services.feedback.fastpath import DecodedEvent, fast_decode
from tuneloop.services.feedback.redaction import Redacted, redact
from tuneloop.services.store.postgres import RejectedRow

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class RawRecord:
    """One message as read from the bus."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


# What a dead letter keeps of its record at most: enough to see what went wrong, and far
# below any broker's request limit (Kafka's default is 1 MiB), whatever arrived.
KEPT_BYTES = 64 * 1024
_PARTIAL_TAIL = re.compile(r"[\w.@+()\- ]*\Z")


@dataclass(frozen=True)
class DeadLetter:
    """A record ingest keeps aside with its reason; ``event_id`` is the record's own id
    when it has one (a feedback event's, a shadow pair's)."""

    record: RawRecord
    reason: str
    event_id: str | None = None
    keep_raw: bool = False  # ``ingest.keep_raw_dead_letters``: store the payload unredacted

    @property
    def dead_letter_id(self) -> str:
        """The record's place, and a checksum of its bytes: a redelivered record keeps its
        id, while a different record at the same offset (a broker that restarted with its
        topics empty, as the embedded in-memory one does) gets a new one."""
        crc = zlib.crc32(self.record.value or b"")
        return f"{self.record.topic}:{self.record.partition}:{self.record.offset}:{crc:08x}"

    @property
    def size(self) -> int:
        """The record's length in bytes, whatever is kept of it."""
        return len(self.record.value or b"")

    @property
    def sha256(self) -> str:
        """The checksum of the record's bytes, whatever is kept of them."""
        return hashlib.sha256(self.record.value or b"").hexdigest()

    @property
    def truncated(self) -> bool:
        """True when :attr:`payload` holds less than the whole record."""
        return self._kept[1]

    @property
    def payload(self) -> bytes:
        """What is kept of the record, in DuckDB and on the dead-letter topic: its bytes
        with PII redacted (as text; bytes that are not UTF-8 become U+FFFD), unless the
        raw payload is kept on purpose; at most :data:`KEPT_BYTES` of them, so a dead
        letter is always publishable (``size`` and ``sha256`` describe the whole)."""
        return self._kept[0]

    @cached_property
    def _kept(self) -> tuple[bytes, bool]:
        value = self.record.value or b""
        head = value[:KEPT_BYTES]
        if self.keep_raw:
            return head, len(head) < len(value)
        text = head.decode("utf-8", errors="replace")
        if len(head) < len(value):
            # Cut short: a number or address cut at the end could escape redaction in part.
            text = _PARTIAL_TAIL.sub("", text)
        kept = redact(text).text.encode()
        # Invalid bytes read as U+FFFD (three bytes each) and placeholders can lengthen it.
        cut = kept[:KEPT_BYTES].decode("utf-8", errors="ignore").encode()
        return cut, len(head) < len(value) or len(cut) < len(kept)


# A JSON text's strings, and its numbers outside them (the string alternative first, so a
# number inside a string is read as part of the string).
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?')


def redact_answer(text: str) -> Redacted:
    """``text`` with PII redacted, as :func:`redact` does, except in a JSON object (as a
    ``json`` task reads one: :func:`~tuneloop.services.evaluation.tasks.parse_object`):
    there only its strings are redacted, each re-encoded in its place, so numbers and
    layout stay as they were and the object still parses (``{"order_id": 123456789}`` is
    no ``{"order_id": [PHONE]}``). Keys are strings too (as in :func:`redact_json`): a
    schema's field names hold no PII, and a key that did would leak it. A number in an
    object is kept even where it looks like a phone number: it is the object's content;
    a card number (Luhn) is not, and becomes the string ``"[CARD]"``. Each string is read
    decoded, so an address behind ``\\u0040`` escapes is found too."""
    plain = redact(text)  # cached; nothing found in the whole text is nothing to find
    if (not plain.count and "\\u" not in text) or "{" not in text \
            or parse_object(text) is None:
        return plain
    count = 0

    def token(m: re.Match[str]) -> str:
        nonlocal count
        found = m.group(0)
        if not found.startswith('"'):
            if redact(found).text != "[CARD]":
                return found
            count += 1
            return '"[CARD]"'
        r = redact(json.loads(found))
        if not r.count:
            return found
        count += r.count
        encoded = json.dumps(r.text, ensure_ascii=False)
        try:
            encoded.encode()
        except UnicodeEncodeError:  # a lone surrogate its escapes held: keep it escaped
            encoded = json.dumps(r.text)
        return encoded

    return Redacted(_JSON_TOKEN.sub(token, text), count)


def redact_json(value: object) -> tuple[object, int]:
    """``value`` (decoded JSON) with PII redacted in every string in it, keys included (a
    string holding a JSON object as :func:`redact_answer` redacts one), and the count."""
    if isinstance(value, str):
        r = redact_answer(value)
        return r.text, r.count
    if isinstance(value, dict):
        out, total = {}, 0
        for key, item in value.items():
            clean_key = redact(key)
            out[clean_key.text], n = redact_json(item)
            total += n + clean_key.count
        return out, total
    if isinstance(value, list):
        items = [redact_json(item) for item in value]
        return [i for i, _ in items], sum(n for _, n in items)
    return value, 0


# Errors that one row can cause in a write; anything else (a busy or broken store) is
# the batch's and propagates, so the batch is retried instead of dead-lettered.
ROW_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.ConstraintException, duckdb.ConversionException, duckdb.InvalidInputException,
    duckdb.OutOfRangeException, duckdb.TypeMismatchException, pa.ArrowException, UnicodeError,
    OverflowError, RejectedRow,
)


@dataclass(frozen=True)
class KeyedTable:
    """A table ingest writes keyed: a row whose ``key`` is present already is skipped,
    so a replayed batch changes nothing. ``schema`` lists the columns in row order."""

    name: str
    key: str
    schema: pa.Schema


FEEDBACK_COLUMNS = (
    "event_id", "occurred_at", "ingested_at", "app", "request_id", "adapter_version",
    "messages", "user_text", "completion", "rating", "correction", "label", "language",
    "user_id", "metadata", "redactions", "source_topic", "source_partition", "source_offset",
)


_FEEDBACK_ARROW = pa.schema(
    [
        ("event_id", pa.string()), ("occurred_at", pa.timestamp("us", tz="UTC")),
        ("ingested_at", pa.timestamp("us", tz="UTC")), ("app", pa.string()),
        ("request_id", pa.string()), ("adapter_version", pa.string()),
        ("messages", pa.string()), ("user_text", pa.string()), ("completion", pa.string()),
        ("rating", pa.float64()), ("correction", pa.string()), ("label", pa.string()),
        ("language", pa.string()), ("user_id", pa.string()), ("metadata", pa.string()),
        ("redactions", pa.int32()), ("source_topic", pa.string()),
        ("source_partition", pa.int32()), ("source_offset", pa.int64()),
    ]
)


FEEDBACK_TABLE = KeyedTable("feedback", "event_id", _FEEDBACK_ARROW)


_DEAD_ARROW = pa.schema(
    [
        ("dead_letter_id", pa.string()), ("received_at", pa.timestamp("us", tz="UTC")),
        ("source_topic", pa.string()), ("source_partition", pa.int32()),
        ("source_offset", pa.int64()), ("event_key", pa.string()), ("event_id", pa.string()),
        ("reason", pa.string()), ("payload", pa.binary()), ("size", pa.int64()),
        ("sha256", pa.string()), ("truncated", pa.bool_()),
    ]
)


DEAD_LETTERS_TABLE = KeyedTable("dead_letters", "dead_letter_id", _DEAD_ARROW)


@dataclass
class PreparedBatch:
    """Rows for ``table`` and the dead letters of one batch of records."""

    rows: list[tuple[object, ...]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    redactions: int = 0
    duplicates_in_batch: int = 0
    # The record each row came from (None for events landed directly), so a row the
    # store rejects can become a dead letter.
    records: list[RawRecord | None] = field(default_factory=list)
    table: KeyedTable = FEEDBACK_TABLE


def redact_event(event: FeedbackEvent) -> tuple[FeedbackEvent, int]:
    """The event with PII replaced in every free-text field, and the number of spans."""
    metadata, count = redact_json(event.metadata) if event.metadata else (event.metadata, 0)
    messages = [(m.role, _redact_turn(m.role, m.content)) for m in event.messages]
    completion = redact_answer(event.completion)
    correction = redact_answer(event.correction) if event.correction is not None else None
    label = redact_answer(event.label) if event.label is not None else None
    cleaned = event.model_copy(
        update={
            "messages": [Message(role=role, content=r.text) for role, r in messages],
            "completion": completion.text,
            "correction": correction.text if correction else None,
            "label": label.text if label else None,
            "metadata": metadata,
        }
    )
    count += sum(r.count for _, r in messages) + completion.count + (
        correction.count if correction else 0) + (label.count if label else 0)
    return cleaned, count


def _redact_turn(role: str, content: str) -> Redacted:
    """A chat turn redacted: an assistant's as an answer (:func:`redact_answer`), so an
    object it gave stays one."""
    return redact_answer(content) if role == "assistant" else redact(content)


def event_row(
    event: FeedbackEvent | DecodedEvent, record: RawRecord | None, now: datetime
) -> tuple[tuple[object, ...], int]:
    """The ``feedback`` row of an event, redacted on the way (no intermediate model copy)."""
    redactions = 0
    messages = []
    user_text = ""
    for m in event.messages:
        r = _redact_turn(m.role, m.content)
        redactions += r.count
        messages.append({"role": m.role, "content": r.text})
        if m.role == "user":
            user_text = r.text
    # Answers keep their form: a json task's object with a long number stays valid JSON.
    completion = redact_answer(event.completion)
    correction = redact_answer(event.correction) if event.correction is not None else None
    label = redact_answer(event.label) if event.label is not None else None
    redactions += completion.count + (correction.count if correction else 0) + (
        label.count if label else 0)
    metadata, count = redact_json(event.metadata) if event.metadata else ({}, 0)
    redactions += count
    row = (
        str(event.event_id),
        event.occurred_at,
        now,
        event.app,
        event.request_id,
        event.adapter_version,
        _encode(messages).decode(),
        user_text,
        completion.text,
        event.rating,
        correction.text if correction else None,
        label.text if label else None,
        event.language,
        event.user_id,
        _encode(metadata).decode(),
        redactions,
        record.topic if record else None,
        record.partition if record else None,
        record.offset if record else None,
    )
    return row, redactions


def prepare_batch(
    records: Iterable[RawRecord], max_bytes: int = MAX_EVENT_BYTES, now: datetime | None = None,
    keep_raw: bool = False,
) -> PreparedBatch:
    """Validate and redact a batch. Never raises for bad input: it becomes a dead letter
    (its payload redacted unless ``keep_raw``)."""
    now = now or datetime.now(UTC)
    batch = PreparedBatch()
    seen: set[str] = set()
    for record in records:
        event: FeedbackEvent | DecodedEvent | None = (
            fast_decode(record.value) if len(record.value) <= max_bytes else None
        )
        if event is None:
            try:
                event = parse_event(record.value, max_bytes)
            except InvalidEvent as exc:
                batch.dead.append(DeadLetter(record, exc.reason, exc.event_id, keep_raw))
                continue
        event_id = str(event.event_id)
        if record.key is not None and record.key.decode(errors="replace") != event_id:
            batch.dead.append(
                DeadLetter(record, f"key {record.key!r} does not match event_id {event_id}",
                           event_id, keep_raw)
            )
            continue
        if event_id in seen:
            batch.duplicates_in_batch += 1
            continue
        seen.add(event_id)
        try:
            row, count = event_row(event, record, now)
        except ROW_ERRORS as exc:  # valid JSON the store cannot hold (a lone surrogate)
            batch.dead.append(DeadLetter(record, f"cannot be stored: {exc}", event_id, keep_raw))
            continue
        batch.redactions += count
        batch.rows.append(row)
        batch.records.append(record)
    return batch
