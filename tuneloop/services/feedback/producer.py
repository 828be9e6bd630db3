"""The producer SDK apps use to send feedback: validated, durable, in order.

Every accepted event is first written to a local SQLite outbox (WAL, fsync on
commit), then sent with ``acks=all`` and idempotent retries, and deleted from the
outbox only once the broker acknowledged it. When the broker is unreachable the
events simply stay in the outbox; the next :meth:`FeedbackProducer.flush` (or the
background drainer) replays them in the order they were accepted. A crash of the
app loses nothing that :meth:`send` returned from. A resend after an ambiguous
failure can deliver an event twice; ingest keeps one copy per ``event_id``.

The outbox is bounded (``producer.outbox_max_events``, ``producer.outbox_max_bytes``):
while the broker is away and it is full, :meth:`send` refuses new events with
:class:`OutboxFull` (nothing already accepted is dropped; the caller decides). A record
larger than ``producer.max_record_bytes`` is refused when offered, and one the broker
refuses for good (too large for it, say) is moved to the outbox's ``refused`` table with
the broker's reason, so the records behind it move on.

>>> with FeedbackProducer(settings) as producer:
...     producer.send(event)
...     report = producer.flush(timeout_s=10)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from tuneloop.runtime.files import private_sqlite
from tuneloop.runtime.settings import Settings
from tuneloop.services.feedback.contract import FeedbackEvent, InvalidEvent, parse_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlushReport:
    delivered: int
    pending: int

    @property
    def complete(self) -> bool:
        return self.pending == 0


class OutboxFull(RuntimeError):
    """The outbox holds its limit of records or bytes; nothing was accepted."""


class RecordTooLarge(ValueError):
    """A record larger than ``producer.max_record_bytes``; nothing was accepted."""


class Outbox:
    """An append-only, ordered SQLite queue of encoded events, bounded in records and
    bytes (``None``: unbounded)."""

    def __init__(self, path: Path, max_events: int | None = None,
                 max_bytes: int | None = None) -> None:
        self.path = path
        # Events carry what users wrote: the file is the owner's alone.
        self._db = private_sqlite(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, payload BLOB NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS refused (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL,"
            " payload BLOB NOT NULL, reason TEXT NOT NULL, refused_at REAL NOT NULL)"
        )
        self._lock = threading.Lock()
        self.max_events, self.max_bytes = max_events, max_bytes
        count, size = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        self._count, self._bytes = int(count), int(size)
        self.rejected = 0  # appends refused because the outbox was full

    def append(self, items: Iterable[tuple[str, bytes]]) -> int:
        """Accept ``items`` in one transaction, all or none; raises :class:`OutboxFull`
        when they would take the outbox past its bounds."""
        items = list(items)
        size = sum(len(payload) for _, payload in items)
        with self._lock:
            if (self.max_events is not None and self._count + len(items) > self.max_events) or (
                    self.max_bytes is not None and self._bytes + size > self.max_bytes):
                self.rejected += len(items)
                raise OutboxFull(
                    f"the outbox {self.path} holds {self._count} records ({self._bytes} bytes), "
                    f"its limit (producer.outbox_max_events={self.max_events}, "
                    f"producer.outbox_max_bytes={self.max_bytes}) while the broker is away")
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.executemany("INSERT INTO outbox (event_id, payload) VALUES (?, ?)", items)
            self._db.execute("COMMIT")
            self._count += len(items)
            self._bytes += size
            return cur.rowcount

    def head(self, limit: int) -> list[tuple[int, str, bytes]]:
        with self._lock:
            return self._db.execute(
                "SELECT seq, event_id, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()

    def remove_through(self, seq: int) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            count, size = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox WHERE seq <= ?",
                (seq,)).fetchone()
            self._db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
            self._db.execute("COMMIT")
            self._count -= int(count)
            self._bytes -= int(size)

    def refuse(self, seq: int, reason: str) -> None:
        """Move the record ``seq`` to the ``refused`` table with ``reason``, out of the queue."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT event_id, payload FROM outbox WHERE seq = ?",
                                   (seq,)).fetchone()
            if row is not None:
                self._db.execute("INSERT OR REPLACE INTO refused VALUES (?, ?, ?, ?, ?)",
                                 (seq, row[0], row[1], reason, time.time()))
                self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                self._count -= 1
                self._bytes -= len(row[1])
            self._db.execute("COMMIT")

    def refused(self) -> list[tuple[str, str]]:
        """``(event_id, reason)`` of every record the broker refused for good."""
        with self._lock:
            return [(str(e), str(r)) for e, r in self._db.execute(
                "SELECT event_id, reason FROM refused ORDER BY seq").fetchall()]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            self._db.close()


class FeedbackProducer:
    """Send feedback events to ``kafka.topic``; see the module docstring."""

    def __init__(self, settings: Settings, *, background: bool = False, batch: int = 2000,
                 topic: str | None = None, outbox_path: Path | None = None) -> None:
        self._kafka_cfg = settings.kafka
        self._cfg = settings.producer
        self._max_bytes = settings.ingest.max_event_bytes
        self._batch = batch
        # Another topic (the gateway's shadow pairs) gets its own outbox file.
        self._topic = topic or settings.kafka.topic
        self.outbox = Outbox(outbox_path or settings.outbox_path,
                             self._cfg.outbox_max_events, self._cfg.outbox_max_bytes)
        self._producer: KafkaProducer | None = None
        self._drain_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._drain_forever, daemon=True)
            self._thread.start()

    # -- accepting ---------------------------------------------------------
    def send(self, event: FeedbackEvent | dict[str, Any] | bytes) -> str:
        """Validate and durably accept one event; returns its event_id.

        Raises :class:`InvalidEvent` (the event is not accepted) with the reason, and
        :class:`OutboxFull` while the broker is away and the outbox is at its bound.
        """
        return self.send_many([event])[0]

    def send_many(self, events: Iterable[FeedbackEvent | dict[str, Any] | bytes]) -> list[str]:
        """Accept several events in one outbox transaction (all or none)."""
        items = [self._encode(e) for e in events]
        self.outbox.append(items)
        return [event_id for event_id, _ in items]

    def send_record(self, key: str, payload: bytes) -> None:
        """Durably accept one record that is not a feedback event (the caller validated it).
        Raises :class:`RecordTooLarge` above ``producer.max_record_bytes`` and
        :class:`OutboxFull` at the outbox's bound; either way nothing is accepted."""
        if len(payload) > self._cfg.max_record_bytes:
            raise RecordTooLarge(f"a record of {len(payload)} bytes is larger than "
                                 f"producer.max_record_bytes={self._cfg.max_record_bytes}")
        self.outbox.append([(key, payload)])

    def _encode(self, event: FeedbackEvent | dict[str, Any] | bytes) -> tuple[str, bytes]:
        if isinstance(event, FeedbackEvent):
            raw = event.to_json_bytes()
        elif isinstance(event, bytes):
            raw = event
        else:
            import json

            raw = json.dumps(event, default=str).encode()
        parsed = parse_event(raw, self._max_bytes)  # raises InvalidEvent
        return str(parsed.event_id), raw

    # -- delivering --------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> FlushReport:
        """Deliver what the outbox holds, in order, until empty or ``timeout_s``."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self._cfg.delivery_timeout_s)
        delivered = 0
        while time.monotonic() < deadline:
            done = self._drain_once()
            if done is None:  # broker unreachable: back off, keep the events
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                continue
            sent, refused = done
            delivered += sent
            if sent == 0 and refused == 0:
                break
        return FlushReport(delivered, len(self.outbox))

    def _drain_once(self) -> tuple[int, int] | None:
        """Send one outbox chunk; returns how many were acknowledged and how many set aside
        as refused for good, or None when the broker is unreachable or failed."""
        with self._drain_lock:
            rows = self.outbox.head(self._batch)
            if not rows:
                return 0, 0
            producer = self._connect()
            if producer is None:
                return None
            try:
                futures = []
                for seq, event_id, payload in rows:
                    try:
                        futures.append(producer.send(self._topic, key=event_id.encode(),
                                                     value=payload))
                    except KafkaError as exc:  # refused before sending (too large, say)
                        if not _refused_for_good(exc):
                            raise
                        if futures:  # send those before it; it heads the next chunk
                            rows = rows[:len(futures)]
                            break
                        self._set_aside(seq, event_id, exc)
                        return 0, 1
                producer.flush(timeout=self._cfg.delivery_timeout_s)
                acked_through = None
                for (seq, event_id, _), future in zip(rows, futures, strict=True):
                    if not future.succeeded():
                        if acked_through is None and _refused_for_good(future.exception):
                            self._set_aside(seq, event_id, future.exception)
                            return 0, 1
                        break
                    acked_through = seq
            except KafkaError as exc:
                log.warning("delivery failed, %d events stay in the outbox: %s", len(rows), exc)
                self._reset()
                return None
            if acked_through is not None:
                self.outbox.remove_through(acked_through)
            acked = sum(1 for seq, _, _ in rows if acked_through is not None and seq <= acked_through)
            if acked < len(rows):
                log.warning("broker acknowledged %d of %d events; the rest stay queued", acked, len(rows))
                self._reset()
                return None if acked == 0 else (acked, 0)
            return acked, 0

    def _set_aside(self, seq: int, event_id: str, exc: BaseException | None) -> None:
        log.error("the broker refuses %s for good (%s); kept in %s's refused table, the "
                  "records behind it move on", event_id, exc, self.outbox.path)
        self.outbox.refuse(seq, repr(exc))

    def _connect(self) -> KafkaProducer | None:
        if self._producer is not None:
            return self._producer
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=self._kafka_cfg.bootstrap_servers,
                acks="all",
                enable_idempotence=True,
                # One in flight keeps the outbox order on the partition even across retries.
                max_in_flight_requests_per_connection=1,
                linger_ms=self._cfg.linger_ms,
                retries=5,
                request_timeout_ms=int(self._cfg.delivery_timeout_s * 1000),
                max_block_ms=int(self._cfg.delivery_timeout_s * 1000),
                bootstrap_timeout_ms=int(self._cfg.delivery_timeout_s * 1000),
                reconnect_backoff_max_ms=1000,
            )
        except KafkaError as exc:
            log.info("broker %s unreachable (%s); events wait in the outbox",
                     self._kafka_cfg.bootstrap_servers, exc)
            return None
        return self._producer

    def _reset(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(KafkaError):
                self._producer.close(timeout=0)
            self._producer = None

    def _drain_forever(self) -> None:
        while not self._stop.is_set():
            if self._drain_once() in ((0, 0), None):
                self._stop.wait(0.5)

    # -- lifecycle ---------------------------------------------------------
    def close(self, timeout_s: float = 5.0) -> FlushReport:
        """Flush for up to ``timeout_s``, then close; undelivered events stay in the outbox."""
        report = self.flush(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self._reset()
        self.outbox.close()
        return report

    def __enter__(self) -> FeedbackProducer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _refused_for_good(exc: BaseException | None) -> bool:
    """A broker error that a retry cannot fix (a record too large for it, an invalid one)."""
    return isinstance(exc, KafkaError) and not exc.retriable


__all__ = ["FeedbackProducer", "FlushReport", "InvalidEvent", "Outbox", "OutboxFull",
           "RecordTooLarge"]
