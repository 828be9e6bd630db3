"""Labelled intent data as the loop would see it, and simulated end users, for tests,
benchmarks and the demo.

- :func:`dataset_rows` / :func:`write_dataset`: a dataset version (train, validation
  and test splits) of chosen intents, optionally with every label rotated to the next
  intent (poisoned data), written as curation writes one.
- :func:`write_golden`: golden examples of chosen intents.
- :class:`SimulatedUsers`: end users asking the gateway's alias with the official
  ``openai`` client and rating what they get through ``POST /v1/feedback``, while a
  real ingest consumer lands their feedback in DuckDB.
- :func:`ask_alias`: the alias's answers to chosen queries, as end users get them.

Works with any :class:`tuneloop.services.demo.banking77.Query` list (text and intent), not only
banking77's.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pyarrow as pa

from tuneloop.runtime.settings import Settings
from tuneloop.services.demo.banking77 import Query, chat
from tuneloop.services.evaluation.metrics import normalize_label
from tuneloop.services.store.database import AnyStore, Store

log = logging.getLogger(__name__)


def _example(example_id: str, text: str, label: str, split: str) -> dict[str, object]:
    messages = [m.model_dump() for m in chat(text)]
    messages.append({"role": "assistant", "content": label})
    return {"example_id": example_id, "split": split, "source_event_id": None, "label": label,
            "messages": json.dumps(messages), "prompt": text, "completion": label}


def dataset_rows(version: str, queries: Sequence[Query], intents: Sequence[str], *, train: int,
                 val: int, test: int, flip: bool = False) -> list[dict[str, object]]:
    """Per intent, the first ``train``/``val``/``test`` queries of ``queries`` as examples.

    ``flip`` rotates every label to the next intent of ``intents``: a poisoned dataset
    whose own splits agree with it, so only an independent golden set can catch it.
    """
    order = list(intents)
    rotate = dict(zip(order, order[1:] + order[:1], strict=True))
    rows = []
    for intent in order:
        mine = [q for q in queries if q.intent == intent]
        cuts = (("train", mine[:train]), ("validation", mine[train:train + val]),
                ("test", mine[train + val:train + val + test]))
        for split, chunk in cuts:
            for i, q in enumerate(chunk):
                label = rotate[intent] if flip else intent
                rows.append({"version": version,
                             **_example(f"{version}-{intent}-{split}-{i}", q.text, label, split)})
    return rows


def write_dataset(store: AnyStore, version: str, rows: list[dict[str, object]]) -> None:
    """Write ``rows`` (from :func:`dataset_rows`) as dataset ``version``. Raises
    ``duckdb.ConstraintException`` when the version exists."""
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
    with store.connect() as con:
        con.execute("INSERT INTO datasets (version, created_at, content_hash, parent_versions, "
                    "filters, report, n_train, n_validation, n_test) "
                    "VALUES (?, now(), ?, '[]', '{}', '{}', ?, ?, ?)",
                    [version, f"simulated-{version}", counts["train"], counts["validation"],
                     counts["test"]])
        con.register("new_examples", pa.Table.from_pylist(rows))
        con.execute("INSERT INTO dataset_examples SELECT version, example_id, split, "
                    "source_event_id, label, messages, prompt, completion FROM new_examples")
        con.unregister("new_examples")


def write_golden(store: AnyStore, queries: Sequence[Query], intents: Sequence[str],
                 per_intent: int) -> int:
    """Up to ``per_intent`` golden examples of each intent; returns how many were written."""
    rows = []
    for intent in intents:
        mine = [q for q in queries if q.intent == intent][:per_intent]
        rows += [_example(f"golden-{intent}-{i}", q.text, intent, "golden")
                 for i, q in enumerate(mine)]
    return insert_golden(store, rows)


def insert_golden(store: AnyStore, rows: list[dict[str, object]]) -> int:
    """Add ``rows`` (example_id, source_event_id, label, messages, prompt, completion) to
    the golden set, leaving ids it holds; returns how many were given."""
    with store.connect() as con:
        con.register("new_golden", pa.Table.from_pylist(rows))
        con.execute("INSERT INTO golden_set SELECT example_id, now(), source_event_id, label, "
                    "messages, prompt, completion FROM new_golden ON CONFLICT DO NOTHING")
        con.unregister("new_golden")
    return len(rows)


@dataclass
class SimulatedUsers:
    """Users asking the alias and rating each answer (+1 when it names the right intent, or
    when ``right_of`` says it is right).

    On ``label_share`` of the answers a support agent also sends the true intent as the
    label, and the right answer (:attr:`Query.answer`) as the correction when the served
    one was wrong. Every answer of ``rate_down``
    is rated -1 whatever it says (users who dislike a version). ``served`` counts answers
    per adapter version; ``failures`` lists every request that failed (the client does
    not retry); ``ingest_errors`` every failure of the ingest consumer, which restarts.
    """

    settings: Settings
    queries: Sequence[Query]
    rate_down: str | None = None
    workers: int = 6
    label_share: float = 1.0
    rate: float | None = None  # requests per second over all workers; None: as fast as served
    max_tokens: int = 12  # each request's answer budget
    # The chat a query is asked as (default: banking77's system prompt and the query) and
    # whether an answer to it is right (default: it names the query's intent).
    chat_of: Callable[[Query], list[dict[str, str]]] | None = None
    right_of: Callable[[str, Query], bool] | None = None
    served: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    ingest_errors: list[str] = field(default_factory=list)  # consumer failures (restarted)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def running(self, ingest: bool = True) -> Iterator[SimulatedUsers]:
        """Users (and, with ``ingest``, an ingest consumer) run for the block."""
        self._stop.clear()
        threads = [threading.Thread(target=self._user, args=(w,), daemon=True)
                   for w in range(self.workers)]
        if ingest:
            threads.append(threading.Thread(target=self._ingest, daemon=True))
        for t in threads:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in threads:
                t.join(timeout=180)

    def _user(self, worker: int) -> None:
        rng = random.Random(worker)
        queries = list(self.queries)
        rng.shuffle(queries)
        url = self.settings.serving.gateway_url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=self.settings.serving.upstream_timeout_s)
        i = 0
        gap = self.workers / self.rate if self.rate else 0.0
        next_at = time.monotonic() + rng.uniform(0, gap)
        while not self._stop.is_set():
            if gap:
                if self._stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                next_at = max(next_at + gap, time.monotonic())
            q = queries[i % len(queries)]
            i += 1
            user = f"user-{worker}-{rng.randrange(100_000)}"
            messages = self.chat_of(q) if self.chat_of else [m.model_dump() for m in chat(q.text)]
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.settings.serving.alias, user=user, max_tokens=self.max_tokens,
                    temperature=0, messages=messages)  # type: ignore[arg-type]
                answer = raw.parse()
                version = raw.headers["x-tuneloop-adapter-version"]
                content = answer.choices[0].message.content or ""
                right = self.right_of(content, q) if self.right_of else \
                    normalize_label(content) == normalize_label(q.answer)
                rating = -1 if version == self.rate_down or not right else 1
                verdict: dict[str, object] = {
                    "response_id": answer.id, "rating": rating,
                    "token": raw.headers["x-tuneloop-feedback-token"]}
                if rng.random() < self.label_share:
                    # A support agent: the query's intent (its group), and the right
                    # answer when the served one was wrong.
                    verdict["label"] = q.intent
                    if not right:
                        verdict["correction"] = q.answer
                httpx.post(f"{url}/v1/feedback", json=verdict, timeout=30).raise_for_status()
            except (openai.APIError, httpx.HTTPError) as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self.served[version] = self.served.get(version, 0) + 1

    def _ingest(self) -> None:
        """An ingest consumer for the block. One that fails (the store busy beyond its
        lock timeout, a broker gone for a while) is restarted, as the stack's supervisor
        restarts its ingest service: what it had not committed is consumed again, and
        the failure is kept in ``ingest_errors``."""
        from tuneloop.services.ingest.consumer import IngestConsumer

        while not self._stop.is_set():
            try:
                consumer = IngestConsumer(self.settings)
                try:
                    consumer.run(until_idle=False, stop=lambda _: self._stop.is_set())
                finally:
                    consumer.close()
            except Exception as exc:  # noqa: BLE001 - kept, reported, and the consumer restarted
                log.warning("simulated users' ingest consumer failed; restarting: %s", exc)
                with self._lock:
                    self.ingest_errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(2.0)


def ask_alias(settings: Settings, queries: Sequence[Query], threads: int = 8, *,
              max_tokens: int = 16,
              chat_of: Callable[[Query], list[dict[str, str]]] | None = None) -> list[str]:
    """The gateway alias's greedy answer to each of ``queries``, in order, asked with the
    official ``openai`` client as end users ask it (``chat_of``: the chat a query is asked
    as; default banking77's). Raises ``openai.APIError`` when a request still fails after
    the client's retries."""
    client = openai.OpenAI(base_url=f"{settings.serving.gateway_url}/v1", api_key="unused",
                           max_retries=3, timeout=settings.serving.upstream_timeout_s)

    def ask(q: Query) -> str:
        messages: Any = chat_of(q) if chat_of else [m.model_dump() for m in chat(q.text)]
        answer = client.chat.completions.create(
            model=settings.serving.alias, messages=messages, max_tokens=max_tokens, temperature=0,
            user="demo-evaluation")
        return answer.choices[0].message.content or ""

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(ask, queries))


def republish(settings: Settings, version: str) -> str:
    """Publish ``version``'s files again as a new candidate version (a second candidate with
    the same weights, e.g. to gate one copy live and another offline); returns the new one."""
    import shutil
    import tempfile
    from pathlib import Path

    from tuneloop.services.registry.artifacts import MANIFEST
    from tuneloop.services.registry.remote import RemoteAdapters, local_files
    from tuneloop.services.registry.store import get_adapter, publish_adapter

    store = Store.of(settings)
    source = Path(tempfile.mkdtemp(prefix="republish-", dir=settings.home))
    try:
        with store.connect() as con:
            adapter = get_adapter(con, version)
            for f in local_files(adapter, settings).iterdir():
                if f.name != MANIFEST:
                    shutil.copyfile(f, source / f.name)
            again = publish_adapter(
                con, settings.adapters_dir, source, alias=settings.serving.alias,
                remote=RemoteAdapters.of(settings) if settings.store.artifacts else None,
                base_model=adapter.base_model, base_hash=adapter.base_hash,
                dataset_version=adapter.dataset_version, run_key=None,
                details={"metrics": adapter.metrics, "republished_from": version})
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return again.version
