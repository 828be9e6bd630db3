"""Topic administration and offsets: create the feedback topics, read end offsets and lag."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from tuneloop.runtime.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionOffsets:
    topic: str
    partition: int
    end: int
    committed: int | None

    @property
    def lag(self) -> int:
        return self.end - (self.committed or 0)


def new_topics(cfg: KafkaSettings, names: list[str]) -> list[NewTopic]:
    """How each of ``names`` is created: ``kafka.partitions``, ``kafka.replication_factor``
    replicas, and ``min.insync.replicas`` as a topic config when above 1 (the brokers'
    default, 1, is left alone: the embedded broker is one node)."""
    configs = ({"min.insync.replicas": str(cfg.min_insync_replicas)}
               if cfg.min_insync_replicas > 1 else {})
    return [NewTopic(name, cfg.partitions, cfg.replication_factor, topic_configs=dict(configs))
            for name in names]


def ensure_topics(cfg: KafkaSettings, extra: tuple[str, ...] = ()) -> list[str]:
    """Create the feedback and dead-letter topics (and ``extra``) if missing, as
    :func:`new_topics` describes them; returns those created."""
    admin = KafkaAdminClient(
        bootstrap_servers=cfg.bootstrap_servers, request_timeout_ms=cfg.request_timeout_ms
    )
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in (cfg.topic, cfg.dlq_topic, *extra) if t not in existing]
        created = []
        for topic in new_topics(cfg, wanted):
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s with %d partitions, %d replicas", created,
                     cfg.partitions, cfg.replication_factor)
        return created
    finally:
        admin.close()


def under_replicated(cfg: KafkaSettings, extra: tuple[str, ...] = ()) -> list[str]:
    """tuneloop's topics whose replication or ``min.insync.replicas`` is below what the
    settings ask for, one sentence each (empty when all are as configured or missing)."""
    admin = KafkaAdminClient(
        bootstrap_servers=cfg.bootstrap_servers, request_timeout_ms=cfg.request_timeout_ms
    )
    problems = []
    try:
        names = [t for t in (cfg.topic, cfg.dlq_topic, *extra) if t in set(admin.list_topics())]
        for topic in admin.describe_topics(names):
            # kafka-python 3 names the fields as the protocol does; 2.x used shorter names.
            name = topic.get("name") or topic.get("topic")
            replicas = min((len(p.get("replica_nodes", p.get("replicas")) or [])
                            for p in topic["partitions"]), default=0)
            if replicas < cfg.replication_factor:
                problems.append(f"topic {name} has {replicas} replica(s), below "
                                f"kafka.replication_factor={cfg.replication_factor}")
        if cfg.min_insync_replicas > 1 and names:
            try:
                described = admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, n, ["min.insync.replicas"])
                     for n in names])
            except KafkaError as exc:
                return [*problems, f"could not read min.insync.replicas of {', '.join(names)}: "
                        f"{exc}"]
            for response in described:
                for _, _, _, name, entries in response.resources:
                    value = next((int(e[1]) for e in entries if e[0] == "min.insync.replicas"),
                                 1)
                    if value < cfg.min_insync_replicas:
                        problems.append(f"topic {name} has min.insync.replicas={value}, below "
                                        f"kafka.min_insync_replicas={cfg.min_insync_replicas}")
    finally:
        admin.close()
    return problems


def topic_offsets(cfg: KafkaSettings, topic: str, group_id: str | None) -> list[PartitionOffsets]:
    """End offset and the group's committed offset of each partition of ``topic``.

    End offsets come from a fetch's high watermark rather than ListOffsets: the
    embedded tansu broker answers ListOffsets(latest) with the last *batch's* base
    offset + 1, which undercounts. Seeking one before that and fetching reports the
    true high watermark on tansu and on Kafka alike.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=cfg.bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        request_timeout_ms=cfg.request_timeout_ms,
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        listed = consumer.end_offsets(tps)
        end: dict[TopicPartition, int] = {}
        for tp in tps:
            if listed[tp] == 0:
                end[tp] = 0
            else:
                consumer.seek(tp, listed[tp] - 1)
        deadline = time.monotonic() + 5.0
        while len(end) < len(tps) and time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=200, max_records=1000)
            for tp, batch in records.items():
                if tp not in end and batch:
                    end[tp] = max(consumer.highwater(tp) or 0, batch[-1].offset + 1)
            for tp in tps:
                hw = consumer.highwater(tp)
                if tp not in end and hw is not None and hw <= listed[tp]:
                    end[tp] = hw
        result = []
        for tp in tps:
            committed = consumer.committed(tp) if group_id else None
            result.append(PartitionOffsets(topic, tp.partition, end.get(tp, listed[tp]), committed))
        return result
    except KafkaError:
        raise
    finally:
        consumer.close()
