import json
import uuid
from pathlib import Path

import pytest

from tuneloop.services.demo import banking77
from tuneloop.services.ingest.core import (
    FEEDBACK_COLUMNS,
    ROW_ERRORS,
    RawRecord,
    prepare_batch,
    redact_answer,
    redact_event,
)
from tuneloop.services.ingest.store import write_batch, write_isolating
from tuneloop.services.store.database import AnyStore


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
    assert batch.dead[0].dead_letter_id.startswith("feedback.v1:0:6:")


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


def test_labels_and_metadata_keys_are_redacted_where_the_rest_is() -> None:
    """The same boundary covers the label and metadata keys, on both of ingest's paths."""
    event = next(banking77.to_events(banking77.load("test")[:1]))
    event = event.model_copy(update={
        "label": "refund for jane.doe@example.com",
        "metadata": {"ticket of +44 20 7946 0958": {"اتصل ٠٥٥٥١٢٣٤٥٦٧": "x"}},
    })
    cleaned, count = redact_event(event)
    assert count == 3
    blob = json.dumps(cleaned.model_dump(mode="json"), ensure_ascii=False)
    assert "jane.doe" not in blob and "7946" not in blob and "٠٥٥٥" not in blob
    batch = prepare_batch(_records([event.to_json_bytes()]))
    row = dict(zip(FEEDBACK_COLUMNS, batch.rows[0], strict=True))
    assert row["label"] == "refund for [EMAIL]"
    assert json.loads(str(row["metadata"])) == {"ticket of [PHONE]": {"اتصل [PHONE]": "x"}}
    assert batch.redactions >= 3


def test_a_record_the_store_cannot_hold_is_a_dead_letter() -> None:
    """Valid JSON with a lone UTF-16 surrogate: no UTF-8 string can hold it."""
    events = list(banking77.to_events(banking77.load("test")[:3]))
    raw = [e.to_json_bytes() for e in events]
    poison = raw[1].replace(b'"content":"', b'"content":"\\ud800', 1)
    assert poison != raw[1]
    batch = prepare_batch(_records([raw[0], poison, raw[2]]))
    assert len(batch.rows) == 2 and len(batch.records) == 2
    assert [d.record.offset for d in batch.dead] == [1]
    assert "cannot be stored" in batch.dead[0].reason and "surrogate" in batch.dead[0].reason


def test_a_row_that_fails_the_write_is_isolated_and_dead_lettered(
        tmp_path: Path, any_store: AnyStore) -> None:
    events = list(banking77.to_events(banking77.load("test")[:8]))
    batch = prepare_batch(_records([e.to_json_bytes() for e in events]))
    bad = list(batch.rows[5])
    bad[FEEDBACK_COLUMNS.index("app")] = None  # NOT NULL in the table: the write fails
    batch.rows[5] = tuple(bad)
    store = any_store
    with store.connect() as con:
        with pytest.raises(ROW_ERRORS):  # DuckDB: ConstraintException; Postgres: RejectedRow
            write_batch(con, batch)
        assert write_isolating(con, batch) == 7
        again = prepare_batch(_records([e.to_json_bytes() for e in events]))
        again.rows[5] = tuple(bad)
        assert write_isolating(con, again) == 0  # a replay changes nothing
        stored = con.execute("SELECT count(*) FROM feedback").fetchall()[0][0]
        dead = con.execute("SELECT dead_letter_id, event_id, reason FROM dead_letters").fetchall()
    assert stored == 7
    assert len(dead) == 1 and dead[0][0].startswith("feedback.v1:0:5:")
    assert dead[0][1] == str(events[5].event_id) and "the store rejected it" in dead[0][2]
    assert [d.dead_letter_id.rsplit(":", 1)[0] for d in batch.dead] == ["feedback.v1:0:5"]


def test_only_a_rebalance_excuses_a_failed_offset_commit() -> None:
    from confluent_kafka import KafkaError, KafkaException

    from tuneloop.services.ingest.consumer import _lost_partitions

    assert _lost_partitions(KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS)))
    assert _lost_partitions(KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID)))
    assert not _lost_partitions(KafkaException(KafkaError(KafkaError._TRANSPORT)))
    assert not _lost_partitions(KafkaException(KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE)))


def test_metadata_and_dead_letters_are_redacted_unless_raw_is_kept(
        tmp_path: Path, any_store: AnyStore) -> None:
    event = next(banking77.to_events(banking77.load("test")[:1]))
    event = event.model_copy(update={"metadata": {"agent": "jo@example.com",
                                                  "notes": ["call +44 20 7946 0958", 3]}})
    bad = b'{"note": "not an event", "email": "jo@example.com"}'
    batch = prepare_batch(_records([event.to_json_bytes(), bad]))
    metadata = json.loads(str(batch.rows[0][FEEDBACK_COLUMNS.index("metadata")]))
    assert metadata == {"agent": "[EMAIL]", "notes": ["call [PHONE]", 3]}
    assert batch.rows[0][FEEDBACK_COLUMNS.index("redactions")] == 2
    assert b"jo@example.com" not in batch.dead[0].payload and b"[EMAIL]" in batch.dead[0].payload
    cleaned, count = redact_event(event)
    assert cleaned.metadata == metadata and count == 2
    raw = prepare_batch(_records([bad]), keep_raw=True)
    assert raw.dead[0].payload == bad
    with any_store.connect() as con:
        write_batch(con, batch)
        stored = con.execute("SELECT payload FROM dead_letters").fetchall()[0][0]
    assert b"jo@example.com" not in bytes(stored)


def test_a_dead_letter_keeps_its_id_when_redelivered_and_not_when_the_offset_is_reused(
        tmp_path: Path, any_store: AnyStore) -> None:
    """A broker that restarts with empty topics (the embedded one keeps them in memory)
    hands out offsets again: a new bad record at an old offset is a new dead letter."""
    first = prepare_batch(_records([b"garbage"])).dead[0]
    again = prepare_batch(_records([b"garbage"])).dead[0]
    reused = prepare_batch(_records([b"other garbage"])).dead[0]
    assert first.dead_letter_id == again.dead_letter_id != reused.dead_letter_id
    store = any_store
    with store.connect() as con:
        for record in (first, again, reused):
            write_batch(con, prepare_batch([record.record]))
        (n,) = con.execute("SELECT count(*) FROM dead_letters").fetchone() or (0,)
    assert n == 2


def test_a_json_answer_keeps_its_keys_numbers_and_form_on_both_paths() -> None:
    """Only an object's strings are redacted, in place: ``{"order_id": 123456789}`` stays
    valid JSON (it was ``{"order_id": [PHONE]}``), prose is redacted as before."""
    event = next(banking77.to_events(banking77.load("test")[:1]))
    answer = '{"order_id": 123456789,\n "note": "call +44 20 7946 0958", "to": ["a@b.io"]}'
    fenced = '```json\n{"+44 20 7946 0958": "x", "id": 5551234567}\n```'
    fenced_clean = '```json\n{"[PHONE]": "x", "id": 5551234567}\n```'
    event = event.model_copy(update={
        "messages": [*event.messages, event.messages[1].model_copy(
            update={"role": "assistant", "content": fenced}), event.messages[1]],
        "completion": "call +44 20 7946 0958", "correction": answer,
        "metadata": {"preference": {"chosen": answer}},
    })
    cleaned, count = redact_event(event)
    expected = '{"order_id": 123456789,\n "note": "call [PHONE]", "to": ["[EMAIL]"]}'
    assert cleaned.correction == expected and json.loads(expected)["order_id"] == 123456789
    assert cleaned.completion == "call [PHONE]"
    assert cleaned.messages[2].content == fenced_clean  # the key is, the number is not
    assert cleaned.metadata["preference"]["chosen"] == expected
    assert count == 1 + 1 + 2 + 2
    batch = prepare_batch(_records([event.to_json_bytes()]))
    row = dict(zip(FEEDBACK_COLUMNS, batch.rows[0], strict=True))
    assert row["correction"] == expected and row["redactions"] == count
    assert json.loads(str(row["messages"]))[2]["content"] == fenced_clean
    # Each string is read decoded: an address behind an escape is found as well.
    assert redact_answer('{"to": "a\\u0040b.io"}').text == '{"to": "[EMAIL]"}'
    # A card number is PII whatever its JSON type: it becomes a string, the object stays one.
    card = redact_answer('{"card": 4111111111111111, "phone": 4155552671, "n": -1.5e3}')
    assert card.text == '{"card": "[CARD]", "phone": 4155552671, "n": -1.5e3}'
    assert card.count == 1
    # A lone surrogate behind an escape stays escaped: the row is still valid UTF-8.
    lone = redact_answer('{"note": "mail a@b.io \\ud83d"}')
    assert lone.text == '{"note": "mail [EMAIL] \\ud83d"}' and lone.text.encode()
