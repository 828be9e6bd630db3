"""Side-by-side verdicts: the gateway's pair view and preference events, the live gate's
count of them, and curation's preference pairs from them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from tuneloop.runtime.settings import CanarySettings, CurationSettings, TaskSpec, load_settings
from tuneloop.services.canary.core import FAIL, PASS
from tuneloop.services.canary.live import Preference, Side, count_preferences, live_decision
from tuneloop.services.curation.core import (
    EMPTY,
    NEAR_DUPLICATE,
    TOO_LONG,
    TOO_SHORT,
    USER_CAP,
    Candidate,
    Example,
    GoldenIndex,
    curate,
)
from tuneloop.services.curation.preferences import (
    BAD_CORRECTION,
    GOLDEN,
    SAME_ANSWER,
    correction_pairs,
)
from tuneloop.services.curation.run import curate_version
from tuneloop.services.curation.store import CurationInputs
from tuneloop.services.feedback.signing import SIGNATURE, feedback_token, signed_by_gateway
from tuneloop.serving.gateway.answers import (
    PREFERENCE,
    Served,
    pair_view,
    preference_event,
    shadow_answer,
    shadow_response_id,
)
from tuneloop.serving.gateway.app import create_app
from tuneloop.serving.gateway.protocol import FeedbackRequest

KEY = b"event-key"
CHAT = [{"role": "user", "content": "Is the pool open on Sundays?"}]


def answer(i: int = 0) -> Served:
    return Served(f"resp-{i}", "support-bot", "v1", True, CHAT, "alice", {}, completion="No.")


def test_a_pair_shows_both_answers_in_an_order_that_hides_the_versions() -> None:
    served = answer()
    shadow = shadow_answer(served, "v2", "Yes, from 9 to 5.", 0.4)
    assert shadow.response_id == shadow_response_id("resp-0") and shadow.pair_of == "resp-0"
    view = pair_view(served, shadow)
    assert {a["response_id"] for a in view["answers"]} == {"resp-0", shadow.response_id}
    assert "v1" not in str(view) and "v2" not in str(view)
    assert pair_view(served, shadow) == view  # every look agrees
    orders = {tuple(a["content"] for a in pair_view(answer(i), shadow_answer(
        answer(i), "v2", "Yes.", 0.1))["answers"])[0] for i in range(20)}
    assert orders == {"No.", "Yes."}  # production is not always first


def test_a_preference_event_is_signed_over_the_side_it_chose() -> None:
    served = answer()
    shadow = shadow_answer(served, "v2", "Yes, from 9 to 5.", 0.4)
    request = FeedbackRequest(response_id="resp-0", token="t",
                              preferred_response_id=shadow.response_id)
    event = preference_event(served, shadow, shadow.response_id, request, user_key=b"u",
                             event_key=KEY)
    pref = event.metadata[PREFERENCE]
    assert (pref["chosen_version"], pref["rejected_version"]) == ("v2", "v1")
    assert (pref["chosen"], pref["rejected"]) == ("Yes, from 9 to 5.", "No.")
    assert event.rating is None and event.metadata["source"] == "gateway.preference"
    verdict = Preference(str(event.event_id), event.request_id, "v1", "v2", "v1",
                         event.user_id, event.metadata[SIGNATURE])
    assert count_preferences([verdict], KEY, "v2", "v1", 1) == (1, 0)
    # The same signature does not hold for the other side: a forger cannot flip it.
    flipped = Preference(verdict.event_id, verdict.request_id, "v1", "v1", "v2",
                         verdict.user_id, verdict.signature)
    assert count_preferences([flipped], KEY, "v2", "v1", 1) == (0, 0)
    assert not signed_by_gateway(KEY, verdict.signature, verdict.event_id, "resp-0", "v1",
                                 None, verdict.user_id)  # not a rating either
    with pytest.raises(ValueError, match="neither"):
        preference_event(served, shadow, "resp-9", request, user_key=b"u", event_key=KEY)


def _preference(i: int, chosen: str, user: str) -> Preference:
    from tuneloop.services.feedback.signing import event_signature, preference_extra

    rejected = "v1" if chosen == "v2" else "v2"
    sig = event_signature(KEY, f"e{i}", f"resp-{i}", "v1", None, user,
                          preference_extra(chosen, rejected))
    return Preference(f"e{i}", f"resp-{i}", "v1", chosen, rejected, user, sig)


def test_the_live_gate_rolls_back_a_candidate_raters_prefer_less() -> None:
    cfg = CanarySettings(min_requests=10, min_ratings=0, window_s=10, max_window_s=20)
    liked = [_preference(i, "v2" if i % 5 else "v1", f"u{i}") for i in range(30)]
    disliked = [_preference(i, "v1" if i % 5 else "v2", f"u{i}") for i in range(30)]
    # One voice per user: a user's many verdicts count once.
    stuffed = [_preference(100 + i, "v1", "mallory") for i in range(30)]
    assert count_preferences(liked + stuffed, KEY, "v2", "v1", 1) == (24, 7)
    for verdicts, outcome, verdict in ((liked, PASS, "promote"), (disliked, FAIL, "rollback")):
        won = count_preferences(verdicts, KEY, "v2", "v1", 1)
        cand, inc = Side(requests=40, preferred=won[0]), Side(requests=40, preferred=won[1])
        decision = live_decision("v2", "v1", cand, inc, 15, cfg)
        check = next(c for c in decision.checks if c.name.startswith("side-by-side"))
        assert (check.outcome, decision.verdict) == (outcome, verdict)
    # Verdicts between other versions are not this canary's.
    assert count_preferences([_preference(1, "v2", "u")], KEY, "v3", "v1", 1) == (0, 0)


def test_side_by_side_verdicts_become_preference_pairs() -> None:
    cand = Candidate("e1", datetime(2026, 1, 1, tzinfo=UTC), CHAT, CHAT[0]["content"], "No.",
                     preference={"chosen": "Yes, from 9 to 5.", "rejected": "No.",
                                 "chosen_version": "v2", "rejected_version": "v1"})
    result = correction_pairs([cand], GoldenIndex(), CurationSettings(), TaskSpec(kind="text"))
    (pair,) = result.pairs
    assert (pair.chosen, pair.rejected, pair.source) == ("Yes, from 9 to 5.", "No.",
                                                        "side-by-side")


def test_the_pair_route_needs_the_answers_token_and_a_shadow(tmp_path: Path) -> None:
    settings = load_settings({"home": tmp_path, "serving.admin_key": "k",
                              "serving.replica_urls": ["http://127.0.0.1:9"]})
    app = create_app(settings, "unused", "base-model", kafka=False)
    gateway = app.state.gateway
    served, lonely = answer(0), answer(1)
    shadow = shadow_answer(served, "v2", "Yes.", 0.1)
    for item in (served, lonely, shadow):
        gateway.cache.put(item)
    client = TestClient(app)

    def token(s: Served) -> dict[str, str]:
        return {"x-tuneloop-feedback-token": feedback_token(gateway.event_key, s.response_id,
                                                            s.user)}

    got = client.get("/v1/feedback/pair", params={"response_id": "resp-0"}, headers=token(served))
    assert got.status_code == 200 and len(got.json()["answers"]) == 2
    assert client.get("/v1/feedback/pair", params={"response_id": "resp-0"},
                      headers=token(lonely)).status_code == 403
    assert client.get("/v1/feedback/pair", params={"response_id": "resp-1"},
                      headers=token(lonely)).json()["error"]["code"] == "pair_not_found"
    # A shadow answer is rated through its pair, never on its own.
    assert client.get("/v1/feedback/pair", params={"response_id": shadow.response_id},
                      headers=token(shadow)).status_code == 404

    def prefer(chosen: str) -> int:
        return client.post("/v1/feedback", json={
            "response_id": "resp-0", "token": token(served)["x-tuneloop-feedback-token"],
            "preferred_response_id": chosen}).status_code

    assert prefer("resp-7") == 400
    assert prefer(shadow.response_id) == 503  # valid; this gateway has no Kafka



def test_a_client_cannot_plant_a_preference_and_a_verdict_comes_alone(tmp_path: Path) -> None:
    from tuneloop.serving.gateway.answers import feedback_event

    forged = FeedbackRequest(response_id="resp-0", token="t", rating=1.0,
                             metadata={PREFERENCE: {"chosen": "mine", "rejected": "yours"}})
    event = feedback_event(answer(), "gateway.feedback", forged, user_key=b"u", event_key=KEY)
    assert PREFERENCE not in event.metadata
    settings = load_settings({"home": tmp_path, "serving.admin_key": "k",
                              "serving.replica_urls": ["http://127.0.0.1:9"]})
    app = create_app(settings, "unused", "base-model", kafka=False)
    served = answer()
    app.state.gateway.cache.put(served)
    app.state.gateway.cache.put(shadow_answer(served, "v2", "Yes.", 0.1))
    both = TestClient(app).post("/v1/feedback", json={
        "response_id": "resp-0", "token": feedback_token(app.state.gateway.event_key, "resp-0",
                                                         "alice"),
        "preferred_response_id": "resp-0", "rating": 1})
    assert both.status_code == 400 and both.json()["error"]["param"] == "preferred_response_id"


def test_a_pair_takes_its_prompts_held_out_split_and_the_golden_guard() -> None:
    cands = [Candidate(f"e{i}", datetime(2026, 1, 1, i, tzinfo=UTC),
                       [{"role": "user", "content": f"question {i}"}], f"question {i}", "No.",
                       correction=f"Yes {i}.") for i in range(6)]
    vectors = np.eye(6, 8, dtype=np.float32)
    guard = GoldenIndex(vectors=vectors[:1])  # e0's prompt is near a golden one
    held = [Example("x1", "e1", None, [], "question 1", "Yes 1.", split="test"),
            Example("x2", "e2", None, [], "question 2", "Yes 2.", split="validation")]
    result = correction_pairs(cands, guard, CurationSettings(), TaskSpec(kind="text"),
                              vectors=vectors, examples=held, example_vectors=vectors[1:3])
    splits = {p.source_event_id: p.split for p in result.pairs}
    assert "e0" not in splits and splits["e1"] == "test" and splits["e2"] == "validation"
    assert result.dropped[GOLDEN] == 1


def _asked(i: int, prompt: str, user: str = "alice", **kw: object) -> Candidate:
    fields: dict[str, object] = {
        "event_id": f"e{i}", "occurred_at": datetime(2026, 1, 1, 0, i, tzinfo=UTC),
        "messages": [{"role": "user", "content": prompt}], "prompt": prompt,
        "completion": "We are closed.", "user_id": user}
    fields.update(kw)
    return Candidate(**fields)  # type: ignore[arg-type]


def test_pairs_pass_curations_user_cap_and_content_gates() -> None:
    cfg = CurationSettings(per_user_cap=2, min_chars=5, max_chars=200)
    task = TaskSpec(kind="text")
    flood = [_asked(i, f"when do you open on day {i}", correction=f"At {i}am.") for i in range(6)]
    # The same cap as the examples': 2 of alice's 6 corrections, as curation keeps 2.
    examples = curate(flood, np.eye(6, 8, dtype=np.float32), GoldenIndex(), cfg, task)
    pairs = correction_pairs(flood, GoldenIndex(), cfg, task)
    assert len(pairs.pairs) == len(examples.examples) == 2
    assert pairs.dropped[USER_CAP] == 4
    odd = [_asked(10, "hi?", "bob", correction="Hello."),  # a prompt too short
           _asked(11, "tell me everything", "carol", correction="x" * 300),  # too long
           _asked(12, "   ", "dave", messages=[{"role": "user", "content": " "}],
                  correction="Sure."),  # nothing asked
           _asked(13, "can I bring a dog", "erin", correction="Yes, dogs are welcome."),
           _asked(14, "may I bring my dog", "fay", correction="Yes, on a lead.")]
    # 13 and 14 ask the same in other words: the newer pair is kept, as curation keeps it.
    vectors = np.eye(5, 8, dtype=np.float32)
    vectors[3] = vectors[4]
    result = correction_pairs(odd, GoldenIndex(), cfg, task, vectors=vectors)
    assert [p.source_event_id for p in result.pairs] == ["e14"]
    assert {r: n for r, n in result.dropped.items() if n} == {
        TOO_SHORT: 1, TOO_LONG: 1, EMPTY: 1, NEAR_DUPLICATE: 1}


def test_a_pair_is_held_out_with_the_newer_example_of_its_prompt() -> None:
    """An older correction and a newer good answer to one prompt: curation keeps the newer
    as the example; when that is held out, so is the correction's pair."""
    cfg = CurationSettings(split=(0.2, 0.0, 0.8))
    prompts = [f"what time is checkout in room {i}" for i in range(10)]
    cands = [_asked(i, p, f"u{i}", correction=f"Checkout is at {i % 3 + 10}.")
             for i, p in enumerate(prompts)]
    cands += [_asked(20 + i, p, f"v{i}", completion="At noon.", rating=1.0)
              for i, p in enumerate(prompts)]
    vectors = np.eye(len(cands), 32, dtype=np.float32)
    vectors[10:] = vectors[:10]  # the same prompt, the same vector
    inputs = CurationInputs(cands, [], None, [], None, None)
    curated = curate_version(inputs, vectors, cfg, TaskSpec(kind="text"))
    split_of = {e.prompt: e.split for e in curated.examples}
    assert {e.source_event_id for e in curated.examples} == {f"e{20 + i}" for i in range(10)}
    assert "test" in split_of.values() and len(curated.preferences.pairs) == 10
    for pair in curated.preferences.pairs:
        assert pair.split == split_of[pair.messages[-1]["content"]], pair.source_event_id


def test_a_pair_whose_sides_are_one_answer_by_the_kind_is_left_out(tmp_path: Path) -> None:
    label = correction_pairs([_asked(1, "where is my card", completion="Card arrival",
                                     correction="card_arrival")],
                             GoldenIndex(), CurationSettings(), TaskSpec())
    assert not label.pairs and label.dropped[SAME_ANSWER] == 1
    schema = tmp_path / "order.schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "guests": {"type": "integer"}}}))
    task = TaskSpec(kind="json", json_schema=schema)
    same = _asked(1, "book Paris for two", completion='{"guests":2,\n "city": "Paris"}',
                  correction='{"city": "Paris", "guests": 2}')
    other = _asked(2, "book Oslo for three", completion='{"guests":3,  "city":"Olso"}',
                   correction='{"city":"Oslo","guests":3}')
    result = correction_pairs([same, other], GoldenIndex(), CurationSettings(), task)
    assert result.dropped[SAME_ANSWER] == 1
    (pair,) = result.pairs  # both sides in one form: DPO cannot learn a layout
    assert (pair.chosen, pair.rejected) == ('{"city": "Oslo", "guests": 3}',
                                            '{"guests": 3, "city": "Olso"}')


def test_a_json_pair_keeps_its_numbers_and_is_checked_after_the_scrub(tmp_path: Path) -> None:
    schema = tmp_path / "order.schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["order_id"], "properties": {
        "order_id": {"type": "integer"}, "phone": {"type": "string", "pattern": "^[0-9 +]+$"}}}))
    task = TaskSpec(kind="json", json_schema=schema)
    kept = _asked(1, "where is order 123456789", completion='{"order_id": 12345}',
                  correction='{"order_id": 123456789}')
    broken = _asked(2, "call me about my order", completion='{"order_id": 1}',
                    correction='{"order_id": 2, "phone": "+44 20 7946 0958"}')
    result = correction_pairs([kept, broken], GoldenIndex(), CurationSettings(), task)
    (pair,) = result.pairs
    assert pair.chosen == '{"order_id": 123456789}'
    assert result.dropped[BAD_CORRECTION] == 1  # "[PHONE]" breaks the schema's pattern


def test_the_preference_check_waits_for_the_minimum_sample() -> None:
    cfg = CanarySettings(min_requests=10, min_ratings=8, window_s=10, max_window_s=20)
    few = live_decision("v2", "v1", Side(requests=40, preferred=0), Side(requests=40, preferred=5),
                        15, cfg)
    assert not any(c.name.startswith("side-by-side") for c in few.checks)
    assert few.figures["preference"] == {"candidate": 0, "incumbent": 5}
