"""The canary's I/O: answers through the gateway, the live window, and the swaps it decides.

The decisions themselves are pure (:mod:`tuneloop.services.canary.core`); this module fetches what
they need and carries out what they say:

- :func:`answers` asks one exact version (or the base model) through the gateway's
  internal route ``/admin/v1`` with the official ``openai`` client, many requests in
  flight so vLLM batches them; answers are cached in DuckDB by weights.
- :func:`offline_gate` evaluates the golden set first (a regression rejects without
  spending time on the rest), then the candidate's test split with the labelled events
  written after its dataset.
- :func:`window` reads both versions' requests, errors and latencies from the gateway
  and their ratings from the feedback table, for one live window.
- :func:`start_live`, :func:`conclude`: the swaps, through :mod:`serving.control`, so the
  gateway flips before the registry records (and flips back if the record fails).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
from kafka.errors import KafkaError

from tuneloop.runtime.settings import Settings
from tuneloop.services.canary import store as canary_store
from tuneloop.services.canary.core import (
    FAIL,
    PASS,
    Check,
    Decision,
    Paired,
    Side,
    combine,
    golden_checks,
    improvement_checks,
)
from tuneloop.services.curation import golden
from tuneloop.services.curation.core import Example
from tuneloop.services.curation.datasets import load_examples
from tuneloop.services.curation.store import fresh_examples
from tuneloop.services.evaluation.metrics import evaluate_predictions, normalize_label, normalize_text
from tuneloop.services.ingest.shadow import land_shadow_pairs
from tuneloop.services.registry.artifacts import MANIFEST, WEIGHTS
from tuneloop.services.registry.core import Adapter, vllm_name
from tuneloop.services.registry.store import get_adapter
from tuneloop.services.store.database import Store, StoreBusyError
from tuneloop.serving import control

log = logging.getLogger(__name__)


def _store(settings: Settings) -> Store:
    return Store(settings.db_path, settings.store.lock_timeout_s)


# ------------------------------------------------------------------ answers
def model_name(settings: Settings, version: str | None) -> str:
    """The name the internal route knows: ``support-bot-v7``, or the base model's."""
    if version is not None:
        return vllm_name(settings.serving.alias, version)
    return str(control.GatewayAdmin(settings).state()["base_model"])


def model_key(settings: Settings, adapter: Adapter | None) -> str:
    """What decides a version's answers: its weights' and config's sha256, or the base model."""
    if adapter is None:
        return f"base:{settings.training.base_model}"
    manifest = json.loads((Path(adapter.path) / MANIFEST).read_text())
    files = manifest["files"]
    return f"lora:{files[WEIGHTS]}:{files.get('adapter_config.json', '')}"


def answers(settings: Settings, version: str | None, examples: Sequence[Example]) -> list[str]:
    """``version``'s greedy answers to each example's prompt (cached by weights).

    The version must be loaded on the gateway (``GatewayAdmin.load``) unless it is the
    base model. Raises :class:`serving.control.GatewayError` when the gateway fails.
    """
    cfg = settings.canary
    prompts = [ex.messages[:-1] for ex in examples]
    keys = [canary_store.example_key(p, cfg.max_tokens) for p in prompts]
    with _store(settings).connect() as con:
        key = model_key(settings, get_adapter(con, version) if version is not None else None)
        known = canary_store.cached_answers(con, key, keys)
    missing = {k: p for k, p in zip(keys, prompts, strict=True) if k not in known}
    if missing:
        started = time.perf_counter()
        fresh = asyncio.run(_ask_all(settings, model_name(settings, version), missing))
        log.info("evaluated %s on %d prompts in %.1fs (%d cached)", version or "base",
                 len(missing), time.perf_counter() - started, len(known))
        with _store(settings).connect() as con:
            canary_store.save_answers(con, key, fresh)
        known.update(fresh)
    return [known[k] for k in keys]


async def _ask_all(settings: Settings, name: str,
                   prompts: dict[str, list[dict[str, str]]]) -> dict[str, str]:
    cfg = settings.canary
    client = openai.AsyncOpenAI(base_url=f"{settings.serving.gateway_url}/admin/v1",
                                api_key=control.admin_key(settings), max_retries=2,
                                timeout=settings.serving.upstream_timeout_s)
    gate = asyncio.Semaphore(cfg.eval_concurrency)

    async def one(key: str, messages: list[dict[str, str]]) -> tuple[str, str]:
        async with gate:
            reply = await client.chat.completions.create(
                model=name, messages=messages,  # type: ignore[arg-type]
                max_tokens=cfg.max_tokens, temperature=0)
            return key, (reply.choices[0].message.content or "").strip()

    try:
        try:
            pairs = await asyncio.gather(*(one(k, m) for k, m in prompts.items()))
        except openai.APIStatusError as exc:
            raise control.GatewayError(exc.status_code, f"evaluating {name}: {exc.message}") from None
        except openai.APIConnectionError as exc:
            raise control.GatewayError(0, f"evaluating {name}: {exc}") from None
    finally:
        await client.close()
    return dict(pairs)


def paired(settings: Settings, candidate: str, incumbent: str | None,
           examples: Sequence[Example]) -> Paired:
    """Both versions' answers to ``examples``."""
    return Paired(references=[ex.completion for ex in examples],
                  labels=[ex.label for ex in examples],
                  incumbent=answers(settings, incumbent, examples),
                  candidate=answers(settings, candidate, examples))


# ------------------------------------------------------------------ offline gate
def gate_examples(settings: Settings, candidate: str
                  ) -> tuple[list[Example], list[Example], list[Example]]:
    """The golden set, the candidate's test split, and the labelled events written after
    its dataset (:func:`tuneloop.services.curation.store.fresh_examples`)."""
    with _store(settings).connect() as con:
        adapter = get_adapter(con, candidate)
        gold = golden.load(con)
        if adapter.dataset_version is None:
            return gold, [], []
        test = [ex for ex in load_examples(con, adapter.dataset_version) if ex.split == "test"]
        fresh = fresh_examples(con, adapter.dataset_version, settings.curation,
                               settings.canary.fresh_max_examples)
    return gold, test, fresh


def offline_gate(settings: Settings, candidate: str, incumbent: str | None,
                 look: int = 1) -> Decision:
    """Load the candidate on the gateway, evaluate both versions, decide pass/reject/hold.

    ``look`` counts the looks at the same candidate (see ``canary.offline_looks``);
    answers are cached by weights, so a later look only asks the new events.
    """
    admin = control.GatewayAdmin(settings)
    admin.load(candidate)
    if incumbent is not None:
        admin.load(incumbent)  # already routed: a no-op unless the gateway restarted
    gold, test, fresh = gate_examples(settings, candidate)
    started = time.perf_counter()
    gold_pairs = paired(settings, candidate, incumbent, gold) if gold else Paired([], [], [], [])
    checks, figures = golden_checks(gold_pairs, settings.canary)
    if combine(checks) != "reject":
        examples = test + fresh
        test_pairs = paired(settings, candidate, incumbent, examples) if examples else \
            Paired([], [], [], [])
        more, test_figures = improvement_checks(test_pairs, settings.canary, len(fresh), look)
        checks += more
        figures.update(test_figures)
    figures["evaluation_s"] = round(time.perf_counter() - started, 2)
    return Decision("offline", candidate, incumbent, combine(checks), checks, figures)


def production_check(settings: Settings) -> Decision:
    """Production on the golden set through the gateway, against its score at promotion."""
    cfg = settings.canary
    route = control.registry_route(settings, settings.serving.alias)
    version = route.production
    with _store(settings).connect() as con:
        gold = golden.load(con)
        baseline = canary_store.promoted_score(con, version) if version else None
    if not gold:
        return Decision("freeze", None, version, "ok", figures={"golden_n": 0,
                        "note": "the golden set is empty: nothing to check"})
    got = answers(settings, version, gold)
    report = evaluate_predictions(got, [ex.completion for ex in gold],
                                  [ex.label for ex in gold]
                                  if all(ex.label for ex in gold) else None)
    score = report.macro_f1 if report.macro_f1 is not None else report.exact_match
    checks = []
    if baseline is not None:
        floor = baseline - cfg.freeze_max_drop
        checks.append(Check("golden score vs promotion", FAIL if score < floor else PASS, score,
                            None, f">= {floor:.3f} ({baseline:.3f} at promotion - "
                            f"{cfg.freeze_max_drop})", f"now {score:.3f}"))
    if cfg.freeze_min_score is not None:
        checks.append(Check("golden score minimum", FAIL if score < cfg.freeze_min_score else PASS,
                            score, None, f">= {cfg.freeze_min_score}", f"now {score:.3f}"))
    figures = {"golden_n": report.n, "score": score, "accuracy": report.accuracy,
               "macro_f1": report.macro_f1, "baseline": baseline}
    return Decision("freeze", None, version, combine(checks, "ok", "frozen"), checks, figures)


# ------------------------------------------------------------------ live gate
def start_live(settings: Settings, candidate: str, reason: str) -> float:
    """Send the canary share of users to ``candidate``; returns when its window began."""
    control.promote(settings, candidate, "canary", reason)
    return time.time()


def window(settings: Settings, candidate: str, incumbent: str | None, started_at: float,
           until: float) -> tuple[Side, Side]:
    """Both versions' users from ``started_at`` to ``until``: the gateway's records, DuckDB's
    ratings. One cut-off for both, so requests and ratings describe the same answers."""
    admin = control.GatewayAdmin(settings)
    try:
        seen = admin.observations(settings.serving.alias, started_at, until)["versions"]
    except control.GatewayError as exc:
        log.warning("the gateway's window is unavailable (%s); counting no requests", exc)
        seen = {}
    sides = {}
    for role, version in (("candidate", candidate), ("incumbent", incumbent)):
        got = seen.get(version or "base", {})
        sides[role] = Side(requests=int(got.get("requests", 0)), errors=int(got.get("errors", 0)),
                           latencies_s=list(got.get("latencies_s", [])))
    for version, (rated, bad) in ratings(settings, [candidate, incumbent], started_at,
                                         until).items():
        side = sides["candidate"] if version == candidate else sides["incumbent"]
        side.ratings, side.bad_ratings = rated, bad
    return sides["candidate"], sides["incumbent"]


def ratings(settings: Settings, versions: Sequence[str | None], since: float,
            until: float | None = None) -> dict[str | None, tuple[int, int]]:
    """(rated answers, bad ones) per version for answers given between ``since`` and
    ``until`` (None: now): the last verdict per answer.

    A rating below ``canary.bad_rating_below`` is bad; an answer corrected to something
    else is bad too.
    """
    with _store(settings).connect() as con:
        rows = con.execute(
            "SELECT adapter_version, arg_max(rating, ingested_at), arg_max(correction, ingested_at),"
            " any_value(completion) FROM feedback WHERE app = ? AND occurred_at >= ? AND "
            "occurred_at < ? AND (rating IS NOT NULL OR correction IS NOT NULL) "
            "GROUP BY adapter_version, request_id",
            [settings.serving.alias, datetime.fromtimestamp(since, UTC),
             datetime.fromtimestamp(until if until is not None else time.time() + 1, UTC)],
        ).fetchall()
    out: dict[str | None, tuple[int, int]] = {v: (0, 0) for v in versions}
    for version, rating, correction, completion in rows:
        if version not in out:
            continue
        if rating is not None:
            bad = rating < settings.canary.bad_rating_below
        else:
            bad = normalize_text(correction) != normalize_text(completion)
        rated, bads = out[version]
        out[version] = (rated + 1, bads + int(bad))
    return out


def shadow_summary(settings: Settings, candidate: str, since: float) -> dict[str, Any]:
    """How often the candidate's unseen answers agreed with production's, and, where a label
    or correction came later, which side was right."""
    try:
        land_shadow_pairs(settings, idle_polls=1)
    except (KafkaError, StoreBusyError) as exc:  # a report, not a gate: never fail the canary
        log.warning("shadow pairs not landed, summarising those already in DuckDB: %s", exc)
    with _store(settings).connect() as con:
        rows = con.execute(
            "SELECT s.production_completion, s.candidate_completion, f.label, f.correction "
            "FROM shadow_pairs s LEFT JOIN (SELECT request_id, arg_max(label, ingested_at) AS label,"
            " arg_max(correction, ingested_at) AS correction FROM feedback WHERE label IS NOT NULL"
            " OR correction IS NOT NULL GROUP BY request_id) f ON f.request_id = s.response_id "
            "WHERE s.candidate_version = ? AND s.occurred_at >= ? AND s.candidate_status < 400",
            [candidate, datetime.fromtimestamp(since, UTC)]).fetchall()
    agree = truth = production_right = candidate_right = 0
    for prod, cand, label, correction in rows:
        agree += normalize_label(prod) == normalize_label(cand or "")
        answer = label or correction
        if answer:
            truth += 1
            production_right += normalize_label(prod) == normalize_label(answer)
            candidate_right += normalize_label(cand or "") == normalize_label(answer)
    return {"pairs": len(rows), "agreement": agree / len(rows) if rows else None,
            "with_truth": truth, "production_right": production_right,
            "candidate_right": candidate_right}


def conclude(settings: Settings, decision: Decision) -> None:
    """Carry out a final live verdict: promote the canary, or take it off traffic."""
    candidate = decision.candidate
    assert candidate is not None
    if decision.verdict == "promote":
        control.promote(settings, candidate, "production", decision.reason)
    elif decision.verdict == "rollback":
        control.reject(settings, candidate, decision.reason)
    else:
        raise ValueError(f"{decision.verdict!r} is not a final live verdict")


def reject_candidate(settings: Settings, candidate: str, reason: str) -> None:
    """A candidate that failed the offline gate: never routed, unloaded, rejected."""
    control.reject(settings, candidate, reason)
    try:
        control.GatewayAdmin(settings).unload(candidate)
    except control.GatewayError as exc:
        log.info("unloading %s: %s", candidate, exc)


def gateway_up(settings: Settings) -> bool:
    try:
        return httpx.get(f"{settings.serving.gateway_url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False
