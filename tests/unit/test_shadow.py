"""Shadow pairs land through ingest's keyed write and dead letters (no broker needed here;
tests/integration/test_serving.py lands real ones from the gateway)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from tuneloop.services.ingest.core import RawRecord
from tuneloop.services.ingest.shadow import prepare_pairs
from tuneloop.services.ingest.store import write_isolating
from tuneloop.services.store.database import Store

TOPIC = "tuneloop.shadow.v1"


def _pair(**fields: object) -> bytes:
    pair = {
        "pair_id": str(uuid.uuid4()), "occurred_at": "2026-01-02T03:04:05+00:00",
        "app": "support-bot", "response_id": f"resp-{uuid.uuid4().hex}",
        "messages": [{"role": "user", "content": "where is my card?"}],
        "production_version": "v1", "production_completion": "card_arrival",
        "production_latency_s": 0.2, "candidate_version": "v2",
        "candidate_completion": "card_delivery_estimate", "candidate_status": 200,
        "candidate_latency_s": 0.3,
    } | fields
    return json.dumps(pair).encode()


def _records(values: list[bytes]) -> list[RawRecord]:
    return [RawRecord(TOPIC, 0, i, None, v) for i, v in enumerate(values)]


def test_pairs_land_once_and_bad_records_are_dead_letters(tmp_path: Path) -> None:
    good = _pair()
    bad = _pair(candidate_version="", note="mail jo@example.com")
    values = [good, good, bad, b"not json"]
    batch = prepare_pairs(_records(values))
    assert len(batch.rows) == 1 and batch.duplicates_in_batch == 1
    assert [d.record.offset for d in batch.dead] == [2, 3]
    assert batch.dead[0].reason.startswith("shadow pair: ")
    assert "candidate_version" in batch.dead[0].reason and "note" in batch.dead[0].reason
    # Ingest's dead-letter id and redaction, not a scheme of its own.
    assert batch.dead[0].dead_letter_id.startswith(f"{TOPIC}:0:2:")
    assert b"jo@example.com" not in batch.dead[0].payload
    with Store(tmp_path / "t.duckdb").connect() as con:
        assert write_isolating(con, batch) == 1
        assert write_isolating(con, prepare_pairs(_records(values))) == 0  # a replay
        rows = con.execute("SELECT pair_id, messages, candidate_status FROM shadow_pairs"
                           ).fetchall()
        dead = con.execute("SELECT dead_letter_id, reason FROM dead_letters ORDER BY 1"
                           ).fetchall()
    assert [(r[0], json.loads(r[1]), r[2]) for r in rows] == [
        (json.loads(good)["pair_id"], json.loads(good)["messages"], 200)]
    assert [d[0].rsplit(":", 1)[0] for d in dead] == [f"{TOPIC}:0:2", f"{TOPIC}:0:3"]


def test_a_pair_the_store_cannot_hold_is_isolated(tmp_path: Path) -> None:
    """A status past 32 bits passes the contract (an int) but not the INTEGER column."""
    poison = _pair(candidate_status=2**40)
    batch = prepare_pairs(_records([_pair(), poison, _pair()]))
    assert len(batch.rows) == 3
    with Store(tmp_path / "t.duckdb").connect() as con:
        assert write_isolating(con, batch) == 2
    assert [(d.record.offset, d.reason.split(":")[0]) for d in batch.dead] == [
        (1, "the store rejected it")]


def test_shadow_pairs_are_redacted_like_feedback(tmp_path: Path) -> None:
    """Messages and both completions of a pair lose their PII before they land."""
    batch = prepare_pairs(_records([_pair(
        messages=[{"role": "user", "content": "my card 4111 1111 1111 1111 and a@b.io"}],
        production_completion="call +44 20 7946 0958", candidate_completion="write to x@y.de")]))
    store = Store(tmp_path / "tuneloop.duckdb")
    with store.connect() as con:
        write_isolating(con, batch)
        messages, production, candidate = con.execute(
            "SELECT messages, production_completion, candidate_completion FROM shadow_pairs"
        ).fetchone()
    assert json.loads(messages)[0]["content"] == "my card [CARD] and [EMAIL]"
    assert (production, candidate) == ("call [PHONE]", "write to [EMAIL]")
