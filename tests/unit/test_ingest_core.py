import json
import uuid

from services import banking77
from services.ingest import RawRecord, prepare_batch, redact_event


def _records(payloads: list[bytes], keys: list[bytes | None] | None = None) -> list[RawRecord]:
    keys = keys or [None] * len(payloads)
    return [RawRecord("feedback.v1", 0, i, k, p) for i, (p, k) in enumerate(zip(payloads, keys, strict=True))]


def test_valid_duplicate_and_invalid_records_are_separated() -> None:
    events = list(banking77.to_events(banking77.load("test")[:5]))
    raw = [e.to_json_bytes() for e in events]
    batch = prepare_batch(_records(raw + [raw[0], b"garbage"]))
    assert len(batch.rows) == 5
    assert batch.duplicates_in_batch == 1
    assert [d.record.offset for d in batch.dead] == [6]
    assert "not valid UTF-8 JSON" in batch.dead[0].reason
    assert batch.dead[0].dead_letter_id == "feedback.v1:0:6"


def test_key_must_match_event_id() -> None:
    event = next(banking77.to_events(banking77.load("test")[:1]))
    batch = prepare_batch(_records([event.to_json_bytes()], [str(uuid.uuid4()).encode()]))
    assert not batch.rows
    assert "does not match event_id" in batch.dead[0].reason


def test_redaction_covers_every_free_text_field() -> None:
    event = next(banking77.to_events(banking77.load("test")[:1]))
    event = event.model_copy(update={
        "messages": [*event.messages[:1], event.messages[1].model_copy(
            update={"content": "my email is a@b.io"})],
        "completion": "call +44 20 7946 0958",
        "correction": "card 4111 1111 1111 1111",
    })
    cleaned, count = redact_event(event)
    assert count == 3
    blob = json.dumps(cleaned.model_dump(mode="json"))
    assert "a@b.io" not in blob and "7946" not in blob and "4111" not in blob
