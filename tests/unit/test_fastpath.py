"""The msgspec fast path must never accept what the pydantic contract rejects, nor change a value."""

from __future__ import annotations

import copy
import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from tuneloop.services.demo import banking77
from tuneloop.services.feedback.contract import InvalidEvent, parse_event
from tuneloop.services.feedback.fastpath import fast_decode
from tuneloop.services.ingest.core import event_row

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def _base_events(n: int = 40) -> list[dict[str, Any]]:
    events = banking77.to_events(banking77.load("test")[:n], seed=9, pii_share=0.2)
    return [json.loads(e.to_json_bytes()) for e in events]


def _mutations() -> list[tuple[str, Any]]:
    """(path, new value) pairs; the sentinel DROP removes the field."""
    return [
        ("schema_version", 2), ("schema_version", "1"), ("schema_version", 1.0), ("schema_version", True),
        ("event_id", "not-a-uuid"), ("event_id", "6F1C2E3A-0000-4000-8000-000000000000"),
        ("event_id", "6f1c2e3a000040008000000000000000"), ("event_id", 12),
        ("occurred_at", "2026-11-01T12:00:00"), ("occurred_at", "2026-11-01 12:00:00Z"),
        ("occurred_at", "2026-02-30T12:00:00Z"), ("occurred_at", "2026-11-01T12:00:00+05:30"),
        ("occurred_at", "2026-11-01T12:00:00.123456789Z"), ("occurred_at", 1700000000),
        ("occurred_at", "2026-11-01"),
        ("app", ""), ("app", "x" * 129), ("app", "é" * 100), ("app", None), ("app", 5),
        ("request_id", "r" * 257), ("adapter_version", 3), ("adapter_version", None),
        ("messages", []), ("messages", "hi"), ("messages", [{"role": "user"}]),
        ("messages", [{"role": "user", "content": "   "}]),
        ("messages", [{"role": "user", "content": "\u3000"}]),
        ("messages", [{"role": "user", "content": "hi", "name": "x"}]),
        ("messages", [{"role": "bot", "content": "hi"}]),
        ("messages", [{"role": "system", "content": "only system"}]),
        ("messages", [{"role": "user", "content": 5}]),
        ("completion", None), ("completion", 7), ("completion", ""),
        ("rating", 1.5), ("rating", -1), ("rating", "0.5"), ("rating", None), ("rating", True),
        ("correction", 3), ("label", "l" * 257), ("label", None), ("language", "x" * 33),
        ("user_id", "u" * 129), ("metadata", None), ("metadata", []), ("metadata", {"a": [1, {"b": None}]}),
        ("surprise", 1), ("DROP", "completion"), ("DROP", "messages"), ("DROP", "rating"),
        ("DROP", "metadata"), ("DROP", "event_id"),
    ]


def _apply(event: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    mutated = copy.deepcopy(event)
    if path == "DROP":
        mutated.pop(value, None)
    else:
        mutated[path] = value
    return mutated


def _check(raw: bytes) -> bool:
    """Assert the agreement for one payload; returns whether the fast path took it."""
    fast = fast_decode(raw)
    if fast is None:
        return False
    slow = parse_event(raw)  # must not raise: the fast path only vouches for valid events
    assert event_row(fast, None, NOW) == event_row(slow, None, NOW)
    return True


@pytest.mark.parametrize(("path", "value"), _mutations())
def test_each_mutation_agrees(path: str, value: Any) -> None:
    for event in _base_events(5):
        raw = json.dumps(_apply(event, path, value)).encode()
        try:
            parse_event(raw)
            valid = True
        except InvalidEvent:
            valid = False
        took = _check(raw)
        assert valid or not took


def test_random_combinations_agree() -> None:
    rng = random.Random(1)
    mutations = _mutations()
    base = _base_events()
    taken = 0
    for _ in range(600):
        event = rng.choice(base)
        for path, value in rng.sample(mutations, rng.randint(0, 3)):
            event = _apply(event, path, value)
        taken += _check(json.dumps(event).encode())
    assert taken > 50


@pytest.mark.parametrize("raw", [
    b'{"schema_version": 1, "schema_version": 2}',
    b'"\\ud800"',
    b"\xff",
    b"",
])
def test_odd_bytes_are_left_to_the_contract(raw: bytes) -> None:
    assert fast_decode(raw) is None


def test_duplicate_keys_resolve_the_same_way() -> None:
    event = _base_events(1)[0]
    text = json.dumps(event)
    raw = (text[:-1] + ', "completion": "second"}').encode()
    _check(raw)


def test_ordinary_traffic_takes_the_fast_path() -> None:
    events = banking77.to_events(banking77.load("test")[:300], seed=2)
    assert all(fast_decode(e.to_json_bytes()) is not None for e in events)
