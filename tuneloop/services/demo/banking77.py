"""banking77 customer-support traffic, turned into realistic feedback events.

The served task is intent routing: the support bot reads a customer query and
answers with one of 77 intent names. A replayed event carries the query as the
user turn, a model answer (right with probability ``accuracy``, otherwise a
plausible wrong intent), a rating (+1 right, -1 wrong), and the true intent as
``label`` and, when the answer was wrong, as the human ``correction``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuneloop.data import dataset_dir
from tuneloop.services.feedback.contract import FeedbackEvent, Message

SYSTEM_PROMPT = (
    "You route banking customer-support messages. Answer with the single intent name "
    "that fits the message, nothing else."
)


_CONTACTS = (
    "You can reach me at customer{n}@example.com.",
    "Call me back on +44 20 7946 {n}.",
    "My card number is 4111 1111 1111 1111.",
    "My IBAN is GB82 WEST 1234 5698 7654 32.",
)


@dataclass(frozen=True)
class Query:
    """One user query. ``intent`` is the group the query belongs to (its intent, the
    service it asks); ``target`` is the answer to learn when it is not the group's name
    (an object to extract, a reply), empty for intent routing."""

    text: str
    intent: str
    target: str = ""

    @property
    def answer(self) -> str:
        """What a right answer to the query is: the target, else the intent."""
        return self.target or self.intent


def data_dir() -> Path:
    """banking77 as bundled with tuneloop (``tuneloop/data/banking77``)."""
    return dataset_dir("banking77")


def load(split: str = "train", root: Path | None = None) -> list[Query]:
    """Rows of ``train`` (10,003) or ``test`` (3,080)."""
    if split not in {"train", "test"}:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    path = (root or data_dir()) / f"{split}.csv"
    with path.open(newline="") as fh:
        return [Query(row["text"].strip(), row["category"]) for row in csv.DictReader(fh)]


def intents(root: Path | None = None) -> list[str]:
    """The dataset's intent names (``categories.json``). Raises ``FileNotFoundError``."""
    return list(json.loads(((root or data_dir()) / "categories.json").read_text()))


def chat(query: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[Message]:
    """The chat the support bot answers for one customer query (no system turn when
    ``system_prompt`` is None)."""
    system = [Message(role="system", content=system_prompt)] if system_prompt else []
    return [*system, Message(role="user", content=query)]


def to_events(
    queries: Sequence[Query],
    *,
    app: str = "support-bot",
    accuracy: float = 0.7,
    seed: int = 0,
    start: datetime | None = None,
    spacing_s: float = 1.0,
    adapter_version: str | None = None,
    pii_share: float = 0.0,
    system_prompt: str | None = SYSTEM_PROMPT,
    source: str = "banking77",
) -> Iterator[FeedbackEvent]:
    """Feedback events for ``queries``, deterministic for a seed.

    A wrong answer is another query's answer; a wrong answer's correction is the query's
    own (:attr:`Query.answer`), and every event's label is the query's intent (its group).

    ``pii_share`` of the queries get a customer's contact detail appended, as real
    support traffic does, for ingest to redact.

    Event ids derive from the seed and position, so replaying the same slice twice
    produces the same ids (and ingest keeps one copy).
    """
    rng = random.Random(seed)
    answers = sorted({q.answer for q in queries}) or ["unknown"]
    t0 = start or datetime.now(UTC)
    for i, q in enumerate(queries):
        right = rng.random() < accuracy
        answer = q.answer if right or len(answers) == 1 else rng.choice(
            [a for a in answers if a != q.answer]
        )
        digest = hashlib.sha256(f"{seed}:{i}:{q.text}".encode()).digest()[:16]
        user = f"u{rng.randrange(500):04d}"
        text = q.text
        if pii_share and rng.random() < pii_share:
            text = f"{text} {rng.choice(_CONTACTS).format(n=rng.randrange(1000, 9999))}"
        yield FeedbackEvent(
            schema_version=1,
            event_id=uuid.UUID(bytes=digest, version=4),
            occurred_at=t0 + timedelta(seconds=i * spacing_s),
            app=app,
            request_id=f"req-{digest.hex()[:12]}",
            adapter_version=adapter_version,
            messages=chat(text, system_prompt),
            completion=answer,
            rating=1.0 if right else -1.0,
            correction=None if right else q.answer,
            label=q.intent,
            language="en",
            user_id=hashlib.sha256(user.encode()).hexdigest()[:16],
            metadata={"source": source},
        )


def select(
    queries: Sequence[Query], intents_: Sequence[str] | None = None, limit: int | None = None,
    seed: int = 0,
) -> list[Query]:
    """Queries of the given intents (all if None), shuffled, at most ``limit``."""
    wanted = set(intents_) if intents_ else None
    picked = [q for q in queries if wanted is None or q.intent in wanted]
    random.Random(seed).shuffle(picked)
    return picked[:limit] if limit else picked
