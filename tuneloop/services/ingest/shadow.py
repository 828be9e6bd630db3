"""Shadow pairs: the canary's unseen answers to production requests, landed in DuckDB.

The gateway sends one JSON record per shadowed request to ``serving.shadow_topic``
(key = ``pair_id``): the request, both versions, both answers, both latencies. This
module lands them in ``shadow_pairs`` (schema in :mod:`tuneloop.services.store.database`)
for the canary to compare, through feedback ingest's own machinery
(:mod:`tuneloop.services.ingest.core`): writes keyed by ``pair_id`` (a replay is a
no-op), a record that fails the contract or the store kept in ``dead_letters`` with its
reason under the same ``topic:partition:offset:crc`` id, and offsets committed only
after the write.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import pyarrow as pa
from kafka import KafkaConsumer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneloop.runtime.settings import Settings
from tuneloop.services.feedback.redaction import redact
from tuneloop.services.ingest.core import (
    DeadLetter,
    KeyedTable,
    PreparedBatch,
    RawRecord,
    redact_json,
)
from tuneloop.services.ingest.store import write_isolating
from tuneloop.services.store.database import Store

log = logging.getLogger(__name__)


class ShadowPair(BaseModel):
    """One shadowed request as the gateway sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pair_id: uuid.UUID
    occurred_at: datetime
    app: str = Field(min_length=1)
    response_id: str = Field(min_length=1)
    messages: list[dict[str, str]] = Field(min_length=1)
    production_version: str | None
    production_completion: str
    production_latency_s: float | None = Field(None, ge=0)
    candidate_version: str = Field(min_length=1)
    candidate_completion: str | None
    candidate_status: int
    candidate_latency_s: float | None = Field(None, ge=0)


SHADOW_TABLE = KeyedTable("shadow_pairs", "pair_id", pa.schema([
    ("pair_id", pa.string()), ("occurred_at", pa.timestamp("us", tz="UTC")),
    ("landed_at", pa.timestamp("us", tz="UTC")), ("app", pa.string()),
    ("response_id", pa.string()), ("messages", pa.string()),
    ("production_version", pa.string()), ("production_completion", pa.string()),
    ("production_latency_s", pa.float64()), ("candidate_version", pa.string()),
    ("candidate_completion", pa.string()), ("candidate_status", pa.int32()),
    ("candidate_latency_s", pa.float64()),
]))


def prepare_pairs(records: Iterable[RawRecord], now: datetime | None = None,
                  keep_raw: bool = False) -> PreparedBatch:
    """Check shadow records against :class:`ShadowPair`: rows for ``shadow_pairs``, and a
    dead letter (``shadow pair: <field>: <error>``, payload redacted unless ``keep_raw``)
    for each record that fails. Never raises for bad input; a pair repeated in the batch
    is counted in ``duplicates_in_batch`` and kept once."""
    now = now or datetime.now(UTC)
    batch = PreparedBatch(table=SHADOW_TABLE)
    seen: set[str] = set()
    for record in records:
        try:
            pair = ShadowPair.model_validate_json(record.value)
        except ValidationError as exc:
            batch.dead.append(DeadLetter(record, f"shadow pair: {_reason(exc)}", None, keep_raw))
            continue
        if str(pair.pair_id) in seen:
            batch.duplicates_in_batch += 1
            continue
        seen.add(str(pair.pair_id))
        batch.rows.append(pair_row(pair, now))
        batch.records.append(record)
    return batch


def pair_row(pair: ShadowPair, landed_at: datetime) -> tuple[object, ...]:
    """The ``shadow_pairs`` row of a pair, in :data:`SHADOW_TABLE`'s column order, with PII
    redacted in its messages and both completions as in feedback."""
    messages, _ = redact_json(pair.messages)
    candidate = redact(pair.candidate_completion).text if pair.candidate_completion else None
    return (str(pair.pair_id), pair.occurred_at, landed_at, pair.app, pair.response_id,
            json.dumps(messages), pair.production_version,
            redact(pair.production_completion).text, pair.production_latency_s,
            pair.candidate_version, candidate, pair.candidate_status, pair.candidate_latency_s)


def _reason(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])


def land_shadow_pairs(settings: Settings, idle_polls: int = 2, poll_timeout_ms: int = 1000) -> int:
    """Consume the shadow topic until idle; returns how many new pairs were written.

    Raises ``kafka.errors.KafkaError`` when the broker cannot be reached or the commit
    fails, and DuckDB errors when the store is busy or broken; offsets of a batch not
    written stay uncommitted, so the next run lands it.
    """
    cfg = settings.kafka
    consumer = KafkaConsumer(
        settings.serving.shadow_topic, bootstrap_servers=cfg.bootstrap_servers,
        group_id=f"{cfg.group_id}-shadow", enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        request_timeout_ms=max(cfg.request_timeout_ms, cfg.session_timeout_ms + 1000),
    )
    store = Store.of(settings)
    keep_raw = settings.ingest.keep_raw_dead_letters
    landed = idle = 0
    # Polls return nothing while the group is joining (seconds): only count idle ones after.
    join_deadline = time.monotonic() + 6 * cfg.session_timeout_ms / 1000
    try:
        while idle < idle_polls:
            polled = consumer.poll(timeout_ms=poll_timeout_ms, max_records=5000)
            records = [RawRecord(r.topic, r.partition, r.offset, r.key, r.value or b"")
                       for part in polled.values() for r in part]
            if not records:
                if consumer.assignment() or time.monotonic() > join_deadline:
                    idle += 1
                continue
            idle = 0
            batch = prepare_pairs(records, keep_raw=keep_raw)
            with store.connect(exclusive=False) as con:  # keyed writes, beside others
                landed += write_isolating(con, batch, keep_raw)
            if batch.dead:
                log.warning("%d shadow records kept as dead letters, e.g. %s: %s",
                            len(batch.dead), batch.dead[0].dead_letter_id, batch.dead[0].reason)
            consumer.commit()  # only after the rows are durable
    finally:
        consumer.close()
    if landed:
        log.info("landed %d shadow pairs from %s", landed, settings.serving.shadow_topic)
    return landed
