"""What the gateway keeps of an answer, and the records it makes from one.

An answer the gateway served stays in a bounded :class:`ResponseCache` so a verdict
posted later (``POST /v1/feedback``) can cite it; :func:`feedback_event` turns it into
a feedback v1 event, and :func:`shadow_pair` into the record of a shadowed request.
Both are pure, and both ids are derived from the answer, so a retry sends the same
record and ingest keeps one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tuneloop.services.feedback.contract import FeedbackEvent
from tuneloop.services.feedback.signing import SIGNATURE, event_signature, preference_extra
from tuneloop.serving.gateway.protocol import FeedbackRequest

FEEDBACK_NAMESPACE = uuid.UUID("5b0a3c8e-9d51-4f0e-8a53-1f0c2e7d9b64")
_ROLES = ("system", "user", "assistant", "tool")
PREFERENCE = "preference"  # the metadata key of a side-by-side verdict


@dataclass
class Served:
    """One answer, kept for feedback and shadow comparison."""

    response_id: str
    alias: str
    version: str | None
    chat: bool
    messages: list[dict[str, str]]
    user: str | None
    body: dict[str, Any]
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    completion: str = ""
    latency_s: float = 0.0
    internal: bool = False  # an evaluation request on the admin route, not a user's
    nbytes: int = 0  # the request's size; with the completion's, what the cache holds
    pair_of: str | None = None  # a shadow answer: the response id of the answer it shadows




class ResponseCache:
    """The last answers by response id (and by vLLM's own id): at most ``capacity``
    entries and ``max_bytes`` bytes of requests and answers, the oldest dropped first."""

    def __init__(self, capacity: int, max_bytes: int) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, Served] = OrderedDict()
        self._sizes: dict[int, tuple[int, int]] = {}  # id(served): (size, keys held)

    def put(self, served: Served, *keys: str | None) -> None:
        for key in (served.response_id, *keys):
            if not key:
                continue
            old = self._items.get(key)
            if old is served:
                self._items.move_to_end(key)
                continue
            if old is not None:
                self._release(old)
            self._items[key] = served
            size, held = self._sizes.get(id(served), (served.nbytes + len(
                served.completion.encode()), 0))
            if held == 0:
                self.nbytes += size
            self._sizes[id(served)] = (size, held + 1)
        while self._items and (len(self._items) > self.capacity or self.nbytes > self.max_bytes):
            _, oldest = self._items.popitem(last=False)
            self._release(oldest)

    def _release(self, served: Served) -> None:
        size, held = self._sizes[id(served)]
        if held > 1:
            self._sizes[id(served)] = (size, held - 1)
        else:
            del self._sizes[id(served)]
            self.nbytes -= size

    def get(self, key: str) -> Served | None:
        return self._items.get(key)


def user_id(user: str, key: bytes) -> str:
    """Who ``user`` is in feedback: a keyed hash (HMAC-SHA256 under ``key``), the same for
    the same user, and not reversible by hashing guesses (e-mail addresses) without the key."""
    return hmac.new(key, user.encode(), hashlib.sha256).hexdigest()[:32]


def verdict_of(verdict: FeedbackRequest) -> str:
    """What a verdict says, as one string: the same for a retry, another for a change."""
    return json.dumps(verdict.model_dump(exclude={"response_id", "metadata", "token"},
                                         exclude_none=True), sort_keys=True)


def feedback_event(served: Served, source: str, verdict: FeedbackRequest | None = None, *,
                   user_key: bytes, event_key: bytes = b"", change: int = 0) -> FeedbackEvent:
    """The feedback v1 event of an answer (``source`` ``gateway.served``) or of a verdict
    on it (``gateway.feedback``). The user is hashed under ``user_key``, never sent as
    given; the gateway's own metadata (``source``, ``latency_ms``) wins over a client's.
    Signed with ``event_key`` (see :mod:`tuneloop.services.feedback.signing`).

    The event id is derived from what the verdict says and ``change``, the number of
    times its user changed their verdict on this answer before (:class:`VerdictChanges`):
    a verdict posted again is the same event (ingest keeps one), and a verdict changed
    back (+1, -1, +1) is a new one, so the last still wins where verdicts are counted.
    Raises ``pydantic.ValidationError`` when the answer cannot make a valid event."""
    verdict_fields: dict[str, Any] = {}
    if verdict is not None:
        verdict_fields = verdict.model_dump(exclude={"response_id", "metadata", "token"},
                                            exclude_none=True)
        verdict_fields.pop("preferred_response_id", None)  # a preference: preference_event
    key = json.dumps([served.response_id, source, verdict_fields, *([change] if change else [])],
                     sort_keys=True)
    event_id = uuid.uuid5(FEEDBACK_NAMESPACE, key)
    metadata: dict[str, Any] = dict(verdict.metadata) if verdict is not None else {}
    metadata.pop(PREFERENCE, None)  # only the gateway says what a rater preferred
    metadata.update(source=source, latency_ms=round(1000 * served.latency_s, 1))
    uid = user_id(served.user, user_key) if served.user else None
    if event_key:
        metadata[SIGNATURE] = event_signature(event_key, str(event_id), served.response_id,
                                              served.version, verdict_fields.get("rating"), uid)
    return FeedbackEvent(
        schema_version=1, event_id=event_id, occurred_at=served.occurred_at,
        app=served.alias, request_id=served.response_id, adapter_version=served.version,
        messages=[m for m in served.messages if m["role"] in _ROLES],
        completion=served.completion, user_id=uid, metadata=metadata, **verdict_fields,
    )


def shadow_pair(served: Served, candidate: str, candidate_completion: str | None,
                candidate_status: int, candidate_latency_s: float) -> dict[str, Any]:
    """The record of a shadowed request (``tuneloop.services.ingest.shadow.ShadowPair``):
    production's answer beside the candidate's, keyed by a ``pair_id`` derived from the
    response id."""
    return {
        "pair_id": str(pair_uuid(served.response_id)),
        "occurred_at": served.occurred_at.isoformat(), "app": served.alias,
        "response_id": served.response_id, "messages": served.messages,
        "production_version": served.version, "production_completion": served.completion,
        "production_latency_s": served.latency_s, "candidate_version": candidate,
        "candidate_completion": candidate_completion, "candidate_status": candidate_status,
        "candidate_latency_s": candidate_latency_s,
    }


def pair_uuid(response_id: str) -> uuid.UUID:
    """The id of the shadow pair of the answer ``response_id``."""
    return uuid.uuid5(FEEDBACK_NAMESPACE, f"shadow:{response_id}")


def shadow_response_id(response_id: str) -> str:
    """The response id of the candidate's unseen answer to the same request."""
    return f"resp-{pair_uuid(response_id).hex}"


def shadow_answer(served: Served, candidate: str, completion: str, latency_s: float) -> Served:
    """The candidate's unseen answer to ``served``'s request, kept so a rater can compare
    the two (:func:`pair_view`) and prefer one."""
    return Served(shadow_response_id(served.response_id), served.alias, candidate, served.chat,
                  served.messages, served.user, served.body, served.occurred_at, completion,
                  latency_s, nbytes=served.nbytes, pair_of=served.response_id)


def pair_view(served: Served, shadow: Served) -> dict[str, Any]:
    """Both answers to one request for a rater, in an order that says nothing of which
    version gave which (fixed per pair, so every look at it agrees)."""
    answers = [{"response_id": a.response_id, "content": a.completion}
               for a in (served, shadow)]
    if pair_uuid(served.response_id).int % 2:
        answers.reverse()
    return {"object": "feedback.pair", "pair_id": str(pair_uuid(served.response_id)),
            "messages": served.messages, "answers": answers}


def preference_event(served: Served, shadow: Served, preferred: str, verdict: FeedbackRequest,
                     *, user_key: bytes, event_key: bytes, change: int = 0) -> FeedbackEvent:
    """The feedback v1 event of a side-by-side verdict: on the answer the user got
    (``served``), with ``metadata.preference`` naming the chosen and the rejected answer of
    its pair, their versions and texts. Signed over the versions' order too, so the side a
    verdict chose cannot be changed on the way. Raises ``ValueError`` when ``preferred`` is
    neither answer."""
    if preferred not in (served.response_id, shadow.response_id):
        raise ValueError(f"{preferred!r} is neither {served.response_id} nor its shadow "
                         f"{shadow.response_id}")
    chosen, rejected = (served, shadow) if preferred == served.response_id else (shadow, served)
    source = "gateway.preference"
    # As a rating's (feedback_event): a preference changed back is a new event.
    event_id = uuid.uuid5(FEEDBACK_NAMESPACE, json.dumps(
        [served.response_id, source, preferred, *([change] if change else [])]))
    uid = user_id(served.user, user_key) if served.user else None
    metadata: dict[str, Any] = dict(verdict.metadata)
    metadata.update(source=source, latency_ms=round(1000 * served.latency_s, 1))
    metadata[PREFERENCE] = {
        "pair_id": str(pair_uuid(served.response_id)),
        "chosen_response_id": chosen.response_id, "rejected_response_id": rejected.response_id,
        "chosen_version": chosen.version, "rejected_version": rejected.version,
        "chosen": chosen.completion, "rejected": rejected.completion}
    metadata[SIGNATURE] = event_signature(
        event_key, str(event_id), served.response_id, served.version, None, uid,
        preference_extra(chosen.version, rejected.version))
    return FeedbackEvent(
        schema_version=1, event_id=event_id, occurred_at=served.occurred_at,
        app=served.alias, request_id=served.response_id, adapter_version=served.version,
        messages=[m for m in served.messages if m["role"] in _ROLES],
        completion=served.completion, user_id=uid, metadata=metadata)
