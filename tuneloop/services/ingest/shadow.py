"""Shadow pairs: the canary's unseen answers to production requests, landed in DuckDB.

The gateway sends one JSON record per shadowed request to ``serving.shadow_topic``
(key = ``pair_id``): the request, both versions, both answers, both latencies. This
module lands them in ``shadow_pairs`` (schema in :mod:`tuneloop.services.store.database`) for the canary
to compare, with the same rules as feedback ingest: writes keyed by ``pair_id`` (a replay is a no-op), offsets
committed only after the write, and a record that fails the contract kept in
``dead_letters`` with its reason.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from kafka import KafkaConsumer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneloop.runtime.settings import Settings
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


def land_shadow_pairs(settings: Settings, idle_polls: int = 2, poll_timeout_ms: int = 1000) -> int:
    """Consume the shadow topic until idle; returns how many new pairs were written."""
    cfg = settings.kafka
    topic = settings.serving.shadow_topic
    consumer = KafkaConsumer(
        topic, bootstrap_servers=cfg.bootstrap_servers, group_id=f"{cfg.group_id}-shadow",
        enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        request_timeout_ms=max(cfg.request_timeout_ms, cfg.session_timeout_ms + 1000),
    )
    store = Store(settings.db_path, settings.store.lock_timeout_s)
    landed = idle = 0
    # Polls return nothing while the group is joining (seconds): only count idle ones after.
    join_deadline = time.monotonic() + 6 * cfg.session_timeout_ms / 1000
    try:
        while idle < idle_polls:
            batches = consumer.poll(timeout_ms=poll_timeout_ms, max_records=5000)
            records = [r for part in batches.values() for r in part]
            if not records:
                if consumer.assignment() or time.monotonic() > join_deadline:
                    idle += 1
                continue
            idle = 0
            landed += _write(store, topic, records)
            consumer.commit()  # only after the rows are durable
    finally:
        consumer.close()
    if landed:
        log.info("landed %d shadow pairs from %s", landed, topic)
    return landed


def _write(store: Store, topic: str, records: list[Any]) -> int:
    now = datetime.now(UTC)
    rows: list[list[Any]] = []
    dead: list[list[Any]] = []
    for r in records:
        try:
            pair = ShadowPair.model_validate_json(r.value)
        except ValidationError as exc:
            reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            dead.append([str(uuid.uuid5(uuid.NAMESPACE_URL, f"{topic}/{r.partition}/{r.offset}")),
                         now, topic, r.partition, r.offset,
                         r.key.decode(errors="replace") if r.key else None, None,
                         f"shadow pair: {reason}", r.value])
            continue
        rows.append([str(pair.pair_id), pair.occurred_at, now, pair.app, pair.response_id,
                     json.dumps(pair.messages), pair.production_version,
                     pair.production_completion, pair.production_latency_s,
                     pair.candidate_version, pair.candidate_completion, pair.candidate_status,
                     pair.candidate_latency_s])
    with store.connect() as con:
        before = int(con.execute("SELECT count(*) FROM shadow_pairs").fetchone()[0])  # type: ignore[index]
        con.execute("BEGIN TRANSACTION")
        if rows:
            con.executemany("INSERT INTO shadow_pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                            "ON CONFLICT DO NOTHING", rows)
        if dead:
            con.executemany("INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                            "ON CONFLICT DO NOTHING", dead)
        con.execute("COMMIT")
        after = int(con.execute("SELECT count(*) FROM shadow_pairs").fetchone()[0])  # type: ignore[index]
    if dead:
        log.warning("%d shadow records kept as dead letters", len(dead))
    return after - before
