"""The embedded broker on tansu's S3 storage engine keeps what it acknowledged: records
produced with acks=all, the broker SIGKILLed and started again on the same object store
(the real SeaweedFS, stopped and started again too in one case), and every acknowledged
record is read back once, at the offset it was acknowledged at. On memory storage the
same kill loses them: the check can tell the two apart."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from tuneloop.infra.broker import EmbeddedBroker
from tuneloop.infra.object_store import EmbeddedObjectStore, s3_client
from tuneloop.runtime.processes import free_port, port_open, wait_until
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.feedback.topics import ensure_topics

pytestmark = pytest.mark.integration

RECORDS = 3000


def _settings(home: Path, storage_engine: str, signed: bool = True) -> Settings:
    credentials = {"object_store.access_key_id": "tuneloop-test",
                   "object_store.secret_access_key": uuid.uuid4().hex} if signed else {}
    return load_settings({
        "home": home,
        "kafka.bootstrap_servers": f"127.0.0.1:{free_port()}",
        "kafka.storage_engine": storage_engine,
        "object_store.endpoint": f"http://127.0.0.1:{free_port()}",
        **credentials,
    })


@pytest.fixture
def s3_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The broker on S3 storage; with credentials unless the test is parametrized
    ``signed=False`` (the embedded store then takes unsigned requests)."""
    signed = getattr(request, "param", {}).get("signed", True)
    return _settings(tmp_path / "home", "s3://tuneloop/", signed)


@pytest.fixture
def object_store(s3_settings: Settings) -> Iterator[EmbeddedObjectStore]:
    store = EmbeddedObjectStore(s3_settings)
    store.start()
    yield store
    store.process.stop(sig=signal.SIGKILL)  # nothing left to keep; a clean stop takes ~2 s


def _produce(settings: Settings, n: int) -> dict[bytes, tuple[int, int]]:
    """Send ``n`` distinct records with acks=all; each value with the (partition, offset)
    the broker acknowledged it at."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all",
                             enable_idempotence=True, linger_ms=5)
    try:
        run = uuid.uuid4().hex
        sent = {}
        for i in range(n):
            value = json.dumps({"i": i, "run": run}).encode()
            sent[value] = producer.send(settings.kafka.topic, key=str(i).encode(), value=value)
        producer.flush(timeout=60)
        acked = {}
        for value, future in sent.items():
            metadata = future.get(timeout=30)  # raises for a record the broker refused
            acked[value] = (metadata.partition, metadata.offset)
        return acked
    finally:
        producer.close()


def _consume_all(settings: Settings, expect: int, timeout_s: float = 120.0) -> list[tuple[bytes, int, int]]:
    """Every record of the topic from the beginning, (value, partition, offset); reads
    on for a second after ``expect`` arrived, so a duplicate would be counted too."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers,
                             enable_auto_commit=False, group_id=None)
    try:
        parts = consumer.partitions_for_topic(settings.kafka.topic) or set()
        tps = [TopicPartition(settings.kafka.topic, p) for p in sorted(parts)]
        assert len(tps) == settings.kafka.partitions, f"partitions after the restart: {parts}"
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got: list[tuple[bytes, int, int]] = []
        deadline = time.monotonic() + timeout_s
        settle_until = None
        while time.monotonic() < deadline:
            for tp, batch in consumer.poll(timeout_ms=200).items():
                got += [(r.value, tp.partition, r.offset) for r in batch]
            if len(got) >= expect:
                settle_until = settle_until or time.monotonic() + 1.0
                if time.monotonic() >= settle_until:
                    break
        return got
    finally:
        consumer.close()


def _kill(broker: EmbeddedBroker) -> None:
    """SIGKILL: tansu gets no chance to flush anything. Returns once its port is free
    (its threads close its sockets a moment after its pid is gone)."""
    assert broker.process.stop(sig=signal.SIGKILL)
    wait_until(lambda: not port_open(broker.host, broker.port), 30.0, "the killed broker's port")


@pytest.mark.parametrize(("s3_settings", "also_restart_store"), [
    ({"signed": True}, False), ({"signed": True}, True), ({"signed": False}, False),
], ids=["broker", "broker-and-store", "broker-unsigned-store"], indirect=["s3_settings"])
def test_a_killed_broker_keeps_every_acknowledged_record(
        s3_settings: Settings, object_store: EmbeddedObjectStore, also_restart_store: bool) -> None:
    broker = EmbeddedBroker(s3_settings)
    broker.start()
    try:
        ensure_topics(s3_settings.kafka)
        acked = _produce(s3_settings, RECORDS)
        assert len(acked) == RECORDS
        _kill(broker)
        if also_restart_store:  # SIGKILLed too: its objects are on disk
            assert object_store.process.stop(sig=signal.SIGKILL)
            object_store.start()
        broker.start()
        got = _consume_all(s3_settings, RECORDS)
    finally:
        broker.stop()
    counts = Counter(value for value, _, _ in got)
    assert set(counts) == set(acked), (f"{len(set(acked) - set(counts))} acknowledged "
                                       f"record(s) lost, {len(set(counts) - set(acked))} unknown")
    assert [v for v, c in counts.items() if c > 1] == []
    assert len(got) == RECORDS
    assert {value: (partition, offset) for value, partition, offset in got} == acked


def test_the_log_is_in_the_bucket(s3_settings: Settings, object_store: EmbeddedObjectStore,
                                  tmp_path: Path) -> None:
    """tansu's objects are in the configured bucket, under its cluster's prefix, and the
    store refuses a client without the configured credentials."""
    from botocore.exceptions import ClientError

    broker = EmbeddedBroker(s3_settings)
    broker.start()
    try:
        ensure_topics(s3_settings.kafka)
        _produce(s3_settings, 10)
    finally:
        broker.stop()
    listed = s3_client(s3_settings.object_store).list_objects_v2(Bucket="tuneloop")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert keys and all(k.startswith("clusters/") for k in keys), keys[:5]
    stranger = s3_settings.object_store.model_copy(update={"access_key_id": None,
                                                           "secret_access_key": None})
    with pytest.raises(ClientError):
        s3_client(stranger).list_objects_v2(Bucket="tuneloop")
    # A second home without the credentials finds the store running and is told why it
    # cannot use it, at once.
    other = s3_settings.model_copy(update={"home": tmp_path / "other", "object_store": stranger})
    with pytest.raises(PermissionError, match="refuses tuneloop"):
        EmbeddedObjectStore(other).start(timeout_s=20)


def test_memory_storage_loses_them(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "home", "memory")
    broker = EmbeddedBroker(settings)
    broker.start()
    try:
        ensure_topics(settings.kafka)
        assert len(_produce(settings, 100)) == 100
        _kill(broker)
        broker.start()
        # The topics went with the broker, and every record with them.
        assert settings.kafka.topic in ensure_topics(settings.kafka)
        assert _consume_all(settings, 1, timeout_s=2.0) == []
    finally:
        broker.stop()
