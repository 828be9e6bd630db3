"""A verdict posted again is the same event; a verdict changed back is a new one, so the
last a user said still wins where verdicts are counted, across a gateway restart too.

The gateway is the real app (``create_app``) with no replica and no Kafka; the events it
would produce are kept by a stand-in producer (the producer's own tests run on the real
broker), since what is tested here is which event ids the gateway gives."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.feedback.contract import FeedbackEvent
from tuneloop.services.feedback.signing import feedback_token
from tuneloop.serving.gateway.answers import Served, shadow_answer, shadow_response_id
from tuneloop.serving.gateway.app import create_app

CHAT = [{"role": "user", "content": "When is the branch open?"}]


class Sent:
    """Stands in for the gateway's Kafka producer: what it was given, in order."""

    def __init__(self) -> None:
        self.events: list[FeedbackEvent] = []

    def send(self, event: FeedbackEvent) -> None:
        self.events.append(event)


def gateway_client(settings: Settings, sent: Sent) -> tuple[TestClient, str]:
    app = create_app(settings, "unused", "base-model", kafka=False)
    gateway = app.state.gateway
    gateway.feedback_producer = sent
    served = Served("resp-0", "support-bot", "v1", True, CHAT, "alice", {}, completion="No.")
    gateway.cache.put(served)
    gateway.cache.put(shadow_answer(served, "v2", "From 9 to 5.", 0.1))
    return TestClient(app), feedback_token(gateway.event_key, "resp-0", "alice")


def test_a_verdict_changed_back_is_a_new_event_and_a_retry_is_not(tmp_path: Path) -> None:
    settings = load_settings({"home": tmp_path, "serving.admin_key": "k",
                              "serving.replica_urls": ["http://127.0.0.1:9"]})
    sent = Sent()
    client, token = gateway_client(settings, sent)

    def rate(rating: float, at: TestClient | None = None) -> str:
        resp = (at or client).post("/v1/feedback", json={
            "response_id": "resp-0", "token": token, "rating": rating})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["event_id"])

    up, down, up_again, retry = rate(1), rate(-1), rate(1), rate(1)
    assert len({up, down, up_again}) == 3  # each change an event of its own
    assert retry == up_again  # the same verdict again: ingest keeps one
    assert [e.rating for e in sent.events] == [1, -1, 1, 1]

    # Side by side: A, B, then A again.
    other = shadow_response_id("resp-0")

    def prefer(chosen: str) -> str:
        resp = client.post("/v1/feedback", json={
            "response_id": "resp-0", "token": token, "preferred_response_id": chosen})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["event_id"])

    a, b, a_again = prefer("resp-0"), prefer(other), prefer("resp-0")
    assert len({a, b, a_again}) == 3 and prefer("resp-0") == a_again

    # A new gateway on the same home reads what was said from disk.
    restarted, token_after = gateway_client(settings, Sent())
    assert token_after == token
    assert rate(1, restarted) == up_again
    assert rate(-1, restarted) not in (down, up, up_again)
