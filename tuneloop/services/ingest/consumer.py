"""The ingest consumer: poll, prepare, dead-letter, then write rows and offsets at once.

Offsets are stored outside Kafka: each batch's rows, its dead letters and the
offsets the group goes on from land in one store transaction
(:func:`~tuneloop.services.ingest.store.write_batch`), and a member given partitions
seeks to the stored offsets before it reads. A batch is thus landed exactly once,
whichever member reads it and wherever one dies. Dead letters are acknowledged on
``feedback.v1.dlq`` before that transaction (a crash in between sends them again,
under the same key). The offsets are then committed to Kafka as well, for the lag
that ``tuneloop status`` and Kafka's own tools show. The writes are also keyed
(event_id, and topic:partition:offset for dead letters): a replay changes nothing.
A member that loses its partitions first lets its batch in flight land, so the new
owner starts after it.

A slow batch does not cost the consumer its partitions: librdkafka heartbeats
from a background thread, and ``max_poll_interval_ms`` is set far above any
batch's duration. If the group rebalances anyway (another consumer joins), the
commit fails with a ``KafkaException``; the batch is already written, so the
new owner's replay is a no-op and this consumer simply carries on.

A one-shot run (``until_idle``) leaves once its own partitions are idle and no
other partition of the topic holds unread records: a partition whose member died
is handed over when that member's session expires, so the run waits for it (or
for the member reading it) rather than leaving its records for the next run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import duckdb
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as KafkaError_
from kafka import KafkaProducer
from kafka.errors import KafkaError

from tuneloop.runtime.settings import Settings
from tuneloop.services.feedback.topics import topic_offsets
from tuneloop.services.ingest.core import DeadLetter, PreparedBatch, RawRecord, prepare_batch
from tuneloop.services.ingest.store import (
    ConsumedOffsets,
    forget_offsets,
    stored_offsets,
    write_isolating,
)
from tuneloop.services.store.database import AnyStore, Store

log = logging.getLogger(__name__)


@dataclass
class IngestStats:
    """What one run of the consumer did."""

    batches: int = 0
    seen: int = 0  # handed to processing, the last batch possibly still being written
    polled: int = 0  # written and committed
    inserted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    redactions: int = 0
    commit_failures: int = 0
    seconds: float = 0.0
    busy_seconds: float = 0.0
    assignments: list[list[int]] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        """Throughput while working: group joins and idle polls do not count."""
        return self.polled / self.busy_seconds if self.busy_seconds else 0.0


BatchHook = Callable[[PreparedBatch], None]


@dataclass
class _UnreadWait:
    """An idle one-shot run's wait for partitions other members hold."""

    targets: dict[int, int] = field(default_factory=dict)  # partition: its end at the start
    done: dict[int, int] = field(default_factory=dict)  # partition: stored offset last seen
    since: float = field(default_factory=time.monotonic)  # when one last moved


# Commit errors that mean this member no longer owns the partitions: the batch is written,
# so the new owner's replay changes nothing. Any other commit error is raised.
_REBALANCE_CODES = frozenset({
    KafkaError_.REBALANCE_IN_PROGRESS, KafkaError_.ILLEGAL_GENERATION,
    KafkaError_.UNKNOWN_MEMBER_ID, KafkaError_._ASSIGNMENT_LOST, KafkaError_._STATE,
    KafkaError_.FENCED_INSTANCE_ID,
})


def next_offsets(raw: list[RawRecord]) -> dict[tuple[str, int], int]:
    """The offset after the last of ``raw``'s records, per (topic, partition)."""
    offsets: dict[tuple[str, int], int] = {}
    for r in raw:
        tp = (r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
    return offsets


def _lost_partitions(exc: KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return getattr(error, "code", lambda: None)() in _REBALANCE_CODES


class IngestConsumer:
    """One member of the ingest consumer group."""

    def __init__(self, settings: Settings, store: AnyStore | None = None) -> None:
        self.settings = settings
        self.cfg = settings.kafka
        self.store = store or Store.of(settings)
        # librdkafka (confluent-kafka) fetches and decodes in native background threads:
        # polling costs a few microseconds an event instead of kafka-python's tens,
        # which leaves the time for validation and the DuckDB write. Heartbeats also
        # run there, so a slow batch does not cost the partitions.
        self.consumer = Consumer(
            {
                "bootstrap.servers": self.cfg.bootstrap_servers,
                "group.id": self.cfg.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.cfg.session_timeout_ms,
                "heartbeat.interval.ms": self.cfg.heartbeat_interval_ms,
                "max.poll.interval.ms": self.cfg.max_poll_interval_ms,
                "socket.timeout.ms": max(self.cfg.request_timeout_ms, 10_000),
            },
            logger=logging.getLogger("librdkafka"),
        )
        self.consumer.subscribe([self.cfg.topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke)
        self._dlq: KafkaProducer | None = None
        self._max_hold_s = settings.store.max_hold_s
        self._held: AbstractContextManager[duckdb.DuckDBPyConnection] | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._held_since = 0.0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-writer")
        self._pending: tuple[Future[int], list[RawRecord], PreparedBatch] | None = None

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Go on from the offsets stored with the rows (read on the writer thread, which
        holds the store between batches); partitions without one start from Kafka's
        committed offset, else the earliest.

        A stored offset is trusted only while the broker still holds the log it points
        into, which Kafka's committed offset for the group there shows: a broker that
        lost its log (the embedded one keeping it in memory, a topic deleted and made
        again) lost those commits too. Otherwise it is forgotten and the partition is
        read again from Kafka's position: the keyed writes make the replay a no-op,
        where seeking into a new log would skip what lies before the old offset.
        """
        wanted = [(tp.topic, tp.partition) for tp in partitions]
        stored = self._writer.submit(self._stored_offsets, wanted).result()
        try:
            committed = {(tp.topic, tp.partition): tp.offset
                         for tp in consumer.committed(partitions, timeout=30)} if stored else {}
        except KafkaException as exc:
            # Which log the stored offsets point into is unknown: read from Kafka's own
            # position this time (a replay at worst), and keep them for the next.
            log.warning("could not read the group's committed offsets (%s); starting from "
                        "Kafka's position, the stored offsets kept", exc)
            consumer.assign(partitions)
            return
        resumed: dict[str, int] = {}
        stale: list[tuple[str, int]] = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if key not in stored:
                continue
            if committed.get(key, -1) < 0:
                stale.append(key)
                continue
            tp.offset = stored[key]
            resumed[f"{tp.topic}[{tp.partition}]"] = stored[key]
        if stale:
            self._writer.submit(self._forget_offsets, stale).result()
            log.warning("forgot stored offsets the broker's log no longer holds (a broker "
                        "that restarted empty?): %s; those partitions are read again from "
                        "Kafka's position, and the keyed writes skip what is already stored",
                        {f"{t}[{p}]": stored[(t, p)] for t, p in stale})
        if resumed:
            log.info("resuming from stored offsets %s", resumed)
        consumer.assign(partitions)

    def _stored_offsets(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        return stored_offsets(self._connection(), self.cfg.group_id, partitions)

    def _forget_offsets(self, partitions: list[tuple[str, int]]) -> None:
        forget_offsets(self._connection(), self.cfg.group_id, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Let the batch in flight land before the partitions go, so their next owner
        reads its stored offsets after it (a failed write is raised by ``_settle``)."""
        if self._pending is not None:
            wait([self._pending[0]])
        consumer.unassign()

    def run(
        self,
        *,
        until_idle: bool = True,
        max_batches: int | None = None,
        stop: Callable[[IngestStats], bool] | None = None,
        on_batch: BatchHook | None = None,
    ) -> IngestStats:
        """Consume batches until idle (``idle_polls_before_exit`` empty polls), or forever.

        ``stop`` is asked before each poll, with the statistics so far. ``on_batch``
        runs after a batch is prepared and before it is written; the benchmark uses
        it to start its clock, tests use it to make a batch slow.
        """
        stats = IngestStats()
        idle = 0
        started = time.monotonic()
        waiting: _UnreadWait | None = None  # for partitions other members hold
        while not (stop and stop(stats)):
            messages = self.consumer.consume(
                num_messages=self.settings.ingest.batch_size,
                timeout=self.settings.ingest.poll_timeout_ms / 1000,
            )
            raw = []
            for m in messages:
                if m.error() is not None:
                    log.warning("consumer error on %s[%s]: %s", m.topic(), m.partition(), m.error())
                    continue
                raw.append(RawRecord(m.topic() or "", m.partition() or 0, m.offset() or 0, m.key(),
                                     m.value() or b""))
            if not raw:
                self._settle(stats)
                self._writer.submit(self._release).result()
                # Polls before the group join completes (about 3 s on tansu) are not idleness.
                if not self.consumer.assignment() and time.monotonic() - started < 60:
                    continue
                idle += 1
                if until_idle and idle >= self.settings.ingest.idle_polls_before_exit:
                    waiting = waiting or _UnreadWait()
                    if self._may_leave(waiting):
                        break
                    idle = 0
                continue
            idle, waiting = 0, None
            busy_from = time.monotonic()
            self._process(raw, stats, on_batch)
            stats.busy_seconds += time.monotonic() - busy_from
            if max_batches is not None and stats.batches + 1 >= max_batches:
                break
        busy_from = time.monotonic()
        self._settle(stats)
        stats.busy_seconds += time.monotonic() - busy_from
        self._writer.submit(self._release).result()
        stats.seconds = time.monotonic() - started
        return stats

    def _may_leave(self, waiting: _UnreadWait) -> bool:
        """Whether an idle one-shot run may leave: no partition it does not hold has
        records the group has not stored (up to each one's end when the wait began), or
        none of them moved for ``max(60 s, 10 sessions)``, long enough for a dead
        member's session to expire and the group to hand its partitions over."""
        try:
            behind = self._behind_elsewhere()
        except (KafkaException, KafkaError, duckdb.Error, OSError) as exc:
            log.warning("could not read the other partitions' progress (%s); leaving: the "
                        "next run goes on from what is stored", exc)
            return True
        now = time.monotonic()
        if not waiting.targets and behind:
            waiting.targets = {p: end for p, (_, end) in behind.items()}
            log.info("idle, but partitions this member does not hold have records the group "
                     "has not stored (partition: stored offset, end) %s: waiting for the group "
                     "to hand them over or read them", behind)
        left = {p: done for p, (done, _) in behind.items()
                if done < waiting.targets.get(p, 0)}
        if not left:
            return True
        if any(done > waiting.done.get(p, -1) for p, done in left.items()):
            waiting.done, waiting.since = left, now
        elif now - waiting.since > max(60.0, 10 * self.cfg.session_timeout_ms / 1000):
            log.warning("leaving with partitions %s not stored to their ends %s: no member "
                        "read them in %.0f s; the next run goes on from them", left,
                        {p: waiting.targets[p] for p in left}, now - waiting.since)
            return True
        return False

    def _behind_elsewhere(self) -> dict[int, tuple[int, int]]:
        """(stored offset, end) of each partition of the topic this member does not hold
        whose records the group has not all stored. As in :meth:`_on_assign`, a stored
        offset counts only where Kafka holds a commit for the partition (a broker that
        lost its log lost the commits too); the store is read only where the commit is
        behind the end."""
        topic = self.cfg.topic
        owned = {tp.partition for tp in self.consumer.assignment() if tp.topic == topic}
        meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or set(meta.partitions) <= owned:
            return {}
        behind = [p for p in topic_offsets(self.cfg, topic, self.cfg.group_id)
                  if p.partition not in owned and (p.committed or 0) < p.end]
        if not behind:
            return {}
        stored = self._writer.submit(self._stored_offsets,
                                     [(topic, p.partition) for p in behind]).result()
        self._writer.submit(self._release).result()
        result = {}
        for p in behind:
            done = 0 if p.committed is None else max(stored.get((topic, p.partition), 0),
                                                     p.committed)
            if done < p.end:
                result[p.partition] = (done, p.end)
        return result

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """The store, held across back-to-back batches for at most ``store.max_hold_s``.

        Opening and closing the DuckDB file costs ~50 ms (a checkpoint on close), as
        much as writing 2,000 events; holding it while busy amortises that, and the
        time cap gives the other processes their turn.
        """
        if self._held is not None and time.monotonic() - self._held_since > self._max_hold_s:
            self._release()
        if self._held is None:
            self._held = self.store.connect(exclusive=False)
            self._con = self._held.__enter__()
            self._held_since = time.monotonic()
        assert self._con is not None
        return self._con

    def _release(self) -> None:
        if self._held is not None:
            held, self._held, self._con = self._held, None, None
            held.__exit__(None, None, None)

    def _process(self, raw: list[RawRecord], stats: IngestStats, on_batch: BatchHook | None) -> None:
        """Prepare this batch while the previous one is written; commit the previous one's offsets.

        Validation and redaction run here, on the polling thread; the DuckDB write
        (native code, the GIL released) and the dead-letter publish run on the
        writer thread, overlapping the next poll. Offsets of a batch are committed
        only once its write has returned.
        """
        stats.seen += len(raw)
        batch = prepare_batch(raw, self.settings.ingest.max_event_bytes,
                              keep_raw=self.settings.ingest.keep_raw_dead_letters)
        if on_batch is not None:
            on_batch(batch)
        self._settle(stats)
        self._pending = (self._writer.submit(self._write, batch, raw), raw, batch)

    def _write(self, batch: PreparedBatch, raw: list[RawRecord]) -> int:
        if batch.dead:
            self._publish_dead_letters(batch.dead)
        return write_isolating(self._connection(), batch,
                               self.settings.ingest.keep_raw_dead_letters,
                               ConsumedOffsets(self.cfg.group_id, next_offsets(raw)),
                               on_rejected=self._publish_dead_letters)

    def _settle(self, stats: IngestStats) -> None:
        """Wait for the batch in flight, then commit its offsets (a failed write raises)."""
        if self._pending is None:
            return
        future, raw, batch = self._pending
        self._pending = None
        inserted = future.result()
        offsets = next_offsets(raw)
        # Partitions revoked meanwhile are their new owner's to commit.
        owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        try:
            if offsets:
                self.consumer.commit(offsets=[TopicPartition(t, p, o)
                                              for (t, p), o in offsets.items()],
                                     asynchronous=False)
        except KafkaException as exc:
            if not _lost_partitions(exc):
                raise
            # Partitions moved during the batch; it is written, so the new owner's
            # replay changes nothing.
            stats.commit_failures += 1
            log.warning("offset commit failed after a rebalance (batch already durable): %s", exc)
        stats.batches += 1
        stats.polled += len(raw)
        stats.inserted += inserted
        stats.duplicates += len(batch.rows) - inserted + batch.duplicates_in_batch
        stats.dead_letters += len(batch.dead)
        stats.redactions += batch.redactions
        stats.assignments.append(sorted(tp.partition for tp in self.consumer.assignment()))
        log.info(
            "batch %d: %d polled, %d new, %d dead letters, offsets %s",
            stats.batches, len(raw), inserted, len(batch.dead),
            {f"{t}[{p}]": o for (t, p), o in offsets.items()},
        )

    def _publish_dead_letters(self, dead_letters: list[DeadLetter]) -> None:
        """Send dead letters and wait for every acknowledgement: a failed delivery raises
        before the batch is written, so its offsets are not stored and it is replayed."""
        if self._dlq is None:
            self._dlq = KafkaProducer(
                bootstrap_servers=self.cfg.bootstrap_servers, acks="all", enable_idempotence=True
            )
        timeout = self.cfg.request_timeout_ms / 1000
        sent = [
            self._dlq.send(
                self.cfg.dlq_topic,
                key=dead.dead_letter_id.encode(),
                value=dead.payload,
                headers=[
                    ("reason", dead.reason.encode()[:4096]),
                    ("source", dead.dead_letter_id.encode()),
                    ("size", str(dead.size).encode()),
                    ("sha256", dead.sha256.encode()),
                    ("truncated", b"1" if dead.truncated else b"0"),
                ],
            )
            for dead in dead_letters
        ]
        self._dlq.flush(timeout=timeout)
        for future in sent:
            future.get(timeout=timeout)

    def close(self) -> None:
        """Release the store, stop the writer, close the dead-letter producer and leave
        the group (a dead-letter producer that fails to close is logged, not raised)."""
        self._writer.submit(self._release).result()
        self._writer.shutdown()
        try:
            if self._dlq is not None:
                self._dlq.close(timeout=5)
        except KafkaError as exc:
            log.warning("closing the dead-letter producer: %s", exc)
        self.consumer.close()
