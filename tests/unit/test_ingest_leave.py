"""When an idle one-shot ingest run leaves: never while partitions other members hold
have records the group has not stored, unless none of them moves for a minute."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError

from tuneloop.runtime.settings import load_settings
from tuneloop.services.ingest import consumer as module
from tuneloop.services.ingest.consumer import IngestConsumer, _UnreadWait


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _member(monkeypatch: pytest.MonkeyPatch, looks: list[object]) -> IngestConsumer:
    """A member whose view of the other partitions is ``looks``, one per check (an
    exception is raised); its Kafka and store are not touched."""
    member = IngestConsumer.__new__(IngestConsumer)
    member.cfg = load_settings({"kafka.session_timeout_ms": 6000}).kafka

    def behind() -> object:
        look = looks.pop(0)
        if isinstance(look, Exception):
            raise look
        return look

    monkeypatch.setattr(member, "_behind_elsewhere", behind)
    return member


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(module.time, "monotonic", clock)
    return clock


def test_it_leaves_at_once_when_nothing_is_unread_elsewhere(
        monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> None:
    assert _member(monkeypatch, [{}])._may_leave(_UnreadWait())


def test_it_waits_while_the_group_reads_and_leaves_at_the_ends_it_saw_first(
        monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> None:
    # Partition 2 is read (another member, or this one after a hand-over) while new records
    # keep arriving: the run leaves once the ends of its first look are stored.
    member = _member(monkeypatch, [{2: (100, 500)}, {2: (300, 600)}, {2: (500, 700)}])
    waiting = _UnreadWait()
    assert not member._may_leave(waiting)
    clock.now += 50
    assert not member._may_leave(waiting)
    clock.now += 50
    assert member._may_leave(waiting)


def test_it_leaves_after_a_minute_without_progress(
        monkeypatch: pytest.MonkeyPatch, clock: _Clock, caplog: pytest.LogCaptureFixture) -> None:
    stuck = {1: (40, 90)}
    member = _member(monkeypatch, [dict(stuck) for _ in range(4)])
    waiting = _UnreadWait()
    assert not member._may_leave(waiting)
    clock.now += 30
    assert not member._may_leave(waiting)
    clock.now += 29
    assert not member._may_leave(waiting)
    clock.now += 2
    assert member._may_leave(waiting)
    assert "not stored to their ends {1: 90}" in caplog.text


def test_a_failed_look_leaves_as_a_run_did_before(
        monkeypatch: pytest.MonkeyPatch, clock: _Clock, caplog: pytest.LogCaptureFixture) -> None:
    member = _member(monkeypatch, [KafkaTimeoutError()])
    assert member._may_leave(_UnreadWait())
    assert "could not read the other partitions' progress" in caplog.text
