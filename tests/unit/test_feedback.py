import json
import uuid
from pathlib import Path

import pytest

from tuneloop.services.demo import banking77
from tuneloop.services.feedback.contract import MAX_EVENT_BYTES, InvalidEvent, json_schema, parse_event


def _event(**overrides: object) -> dict:
    base = {
        "schema_version": 1,
        "event_id": str(uuid.uuid4()),
        "occurred_at": "2026-11-01T12:00:00Z",
        "app": "support-bot",
        "request_id": "req-1",
        "adapter_version": None,
        "messages": [{"role": "user", "content": "my card has not arrived"}],
        "completion": "card_arrival",
        "rating": 1,
    }
    base.update(overrides)
    return base


def _raw(**overrides: object) -> bytes:
    return json.dumps(_event(**overrides)).encode()


def test_valid_event_parses_with_optional_fields_absent() -> None:
    event = parse_event(_raw())
    assert event.user_text == "my card has not arrived"
    assert event.label is None and event.metadata == {}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"schema_version": 2}, "schema_version=2"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"occurred_at": "2026-11-01T12:00:00"}, "timezone"),
        ({"rating": 3}, "rating"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "user turn"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"app": ""}, "app"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_events_name_the_field(overrides: dict, fragment: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        parse_event(_raw(**overrides))
    assert fragment in err.value.reason


def test_missing_field_is_named() -> None:
    data = _event()
    del data["completion"]
    with pytest.raises(InvalidEvent, match="completion"):
        parse_event(json.dumps(data).encode())


def test_size_cap_is_checked_before_parsing() -> None:
    huge = b"{" + b" " * (MAX_EVENT_BYTES + 1) + b"}"
    with pytest.raises(InvalidEvent, match="over the 65536-byte cap"):
        parse_event(huge)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"{not json", b"[1, 2]", b"null"])
def test_non_json_or_non_object_is_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidEvent):
        parse_event(raw)


def test_event_id_is_kept_on_schema_errors_for_the_dead_letter() -> None:
    event_id = str(uuid.uuid4())
    with pytest.raises(InvalidEvent) as err:
        parse_event(_raw(event_id=event_id, rating=5))
    assert err.value.event_id == event_id


def test_exported_schema_file_is_current() -> None:
    from tuneloop.services.feedback.contract import SCHEMA_FILE

    current = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert json.loads(SCHEMA_FILE.read_text()) == json.loads(current), (
        f"{SCHEMA_FILE} is out of date with FeedbackEvent; write json_schema() to it "
        "(json.dumps(..., indent=2, sort_keys=True)) and review the diff")


def test_banking77_events_are_valid_and_deterministic() -> None:
    queries = banking77.load("test")[:50]
    first = list(banking77.to_events(queries, seed=3))
    again = list(banking77.to_events(queries, seed=3))
    assert [e.event_id for e in first] == [e.event_id for e in again]
    for event in first:
        assert parse_event(event.to_json_bytes()) == event
        assert event.label == next(q.intent for q in queries if q.text == event.user_text)
        # A wrong answer carries the human correction; a right one does not.
        assert (event.completion == event.label) == (event.correction is None)


def test_outbox_files_are_the_owners_alone(tmp_path: Path) -> None:
    """What users wrote waits in the outbox: its file, WAL and shared memory are 0600
    whatever the umask, and a file made before with a looser mode is tightened."""
    import os

    from tuneloop.services.feedback.producer import Outbox

    old = os.umask(0o022)
    try:
        outbox = Outbox(tmp_path / "outbox.sqlite")
        outbox.append([("e1", b"{}")])
        loose = tmp_path / "old.sqlite"
        loose.touch(mode=0o644)
        Outbox(loose)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.iterdir() if p.name.startswith(("outbox.sqlite", "old.sqlite"))]
    assert {p.name for p in files} >= {"outbox.sqlite", "outbox.sqlite-wal", "outbox.sqlite-shm"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o600 for p in files}


def test_an_outbox_is_bounded_in_records_and_bytes(tmp_path: Path) -> None:
    """While the broker is away an outbox grows to its bounds, then refuses new records
    (all of an append or none); what it already holds is never dropped."""
    from tuneloop.runtime.settings import load_settings
    from tuneloop.services.feedback.producer import FeedbackProducer, Outbox, OutboxFull, RecordTooLarge

    outbox = Outbox(tmp_path / "a.sqlite", max_events=3, max_bytes=100)
    outbox.append([("e1", b"x" * 10), ("e2", b"x" * 10)])
    with pytest.raises(OutboxFull):
        outbox.append([("e3", b"x"), ("e4", b"x")])  # would be 4 records
    with pytest.raises(OutboxFull):
        outbox.append([("e3", b"x" * 90)])  # would be 110 bytes
    assert len(outbox) == 2 and outbox.nbytes == 20 and outbox.rejected == 3
    outbox.append([("e3", b"x" * 80)])
    seq = outbox.head(1)[0][0]
    outbox.remove_through(seq)
    assert len(outbox) == 2 and outbox.nbytes == 90
    outbox.close()
    reopened = Outbox(tmp_path / "a.sqlite", max_events=3, max_bytes=100)
    assert len(reopened) == 2 and reopened.nbytes == 90  # counted again on open
    reopened.close()

    settings = load_settings({"home": tmp_path, "producer.max_record_bytes": 1024,
                              "kafka.bootstrap_servers": "127.0.0.1:9"})
    producer = FeedbackProducer(settings, outbox_path=tmp_path / "shadow.sqlite")
    with pytest.raises(RecordTooLarge):
        producer.send_record("big", b"x" * 2000)
    assert len(producer.outbox) == 0
    producer.outbox.close()
