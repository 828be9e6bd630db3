"""The live gate's decisions: pure functions from both versions' window to a verdict.

The candidate answers a sticky share of users for a window; its error rate and
bad-rating rate (two-proportion z-tests) and its latency (Mann-Whitney U and the p95
ratio) are compared with production's over the same window. Three outcomes, as in Argo
Rollouts and Kayenta: promote, roll back, or hold and extend the window, up to a
maximum, then roll back. A deployment freeze turns a promotion into a hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneloop.runtime.settings import CanarySettings
from tuneloop.services.canary.core import FAIL, HOLD, PASS, Check, Decision
from tuneloop.services.canary.stats import Latency, mann_whitney, sign_test, two_proportions
from tuneloop.services.evaluation.metrics import normalize_label, normalize_text
from tuneloop.services.feedback.signing import preference_extra, signed_by_gateway


@dataclass
class Side:
    """What one version did for users in the window."""

    requests: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    ratings: int = 0
    bad_ratings: int = 0
    preferred: int = 0  # side-by-side verdicts this version won against the other
    tokens: list[int | None] = field(default_factory=list)  # each latency's output tokens

    def per_token_s(self) -> list[float]:
        """Seconds per output token of the answers whose tokens are known."""
        return [s / n for s, n in zip(self.latencies_s, self.tokens, strict=False) if n]


def live_decision(candidate: str, incumbent: str | None, cand: Side, inc: Side,
                  elapsed_s: float, cfg: CanarySettings, *, per_token: bool = False
                  ) -> Decision:
    """Promote, roll back or hold, from both versions' window so far. ``per_token``: the
    latency check also compares seconds per output token, and fails only when the
    candidate is slower both ways (a text alias, whose answers' length is what an adapter
    learns: the quality checks judge it, latency the serving speed; a candidate slower only
    because it writes more, or only a token because it writes less, is no slower to
    serve)."""
    figures: dict[str, Any] = {
        "elapsed_s": round(elapsed_s, 1),
        "requests": {"candidate": cand.requests, "incumbent": inc.requests},
        "errors": {"candidate": cand.errors, "incumbent": inc.errors},
        "ratings": {"candidate": cand.ratings, "incumbent": inc.ratings},
        "bad_ratings": {"candidate": cand.bad_ratings, "incumbent": inc.bad_ratings},
    }
    enough = min(cand.requests, inc.requests) >= cfg.min_requests and \
        min(cand.ratings, inc.ratings) >= cfg.min_ratings
    sample = (f"requests {cand.requests}/{inc.requests}, ratings {cand.ratings}/{inc.ratings} "
              "(candidate/production)")
    checks = [Check(
        "minimum sample", PASS if enough else HOLD, float(min(cand.requests, inc.requests)), None,
        f">= {cfg.min_requests} requests and >= {cfg.min_ratings} ratings a side", sample)]
    if min(cand.requests, inc.requests) >= cfg.min_requests:
        checks += _request_checks(cand, inc, incumbent is None, cfg, figures, per_token)
    if cfg.min_ratings > 0 and min(cand.ratings, inc.ratings) >= cfg.min_ratings:
        bad = two_proportions(cand.bad_ratings, cand.ratings, inc.bad_ratings, inc.ratings)
        checks.append(Check(
            "bad-rating rate (two-proportion z)", FAIL if bad.p_worse < cfg.alpha else PASS,
            bad.z, bad.p_worse, f"fail if higher with p < {cfg.alpha}",
            f"{bad.candidate_rate:.2%} vs {bad.incumbent_rate:.2%} of rated answers"))
        figures["bad_rating_rate"] = {"candidate": bad.candidate_rate,
                                      "incumbent": bad.incumbent_rate}
    if cand.preferred + inc.preferred >= max(cfg.min_ratings, 1):
        checks.append(_preference_check(cand, inc, cfg, figures))
    elif cand.preferred + inc.preferred:
        figures["preference"] = {"candidate": cand.preferred, "incumbent": inc.preferred}
    verdict, more = _verdict(checks, enough, sample, elapsed_s, cfg)
    return Decision("live", candidate, incumbent, verdict, checks + more, figures)


def _preference_check(cand: Side, inc: Side, cfg: CanarySettings,
                      figures: dict[str, Any]) -> Check:
    """Side by side: raters who saw both versions' answers to the same request preferred
    the candidate's how often (a sign test; rolls back when significantly less than half).
    Tested once there are ``min_ratings`` verdicts, as ratings are."""
    test = sign_test(cand.preferred, inc.preferred)
    total = cand.preferred + inc.preferred
    figures["preference"] = {"candidate": cand.preferred, "incumbent": inc.preferred,
                             "candidate_rate": cand.preferred / total}
    return Check("side-by-side preference (sign test)", FAIL if test.p_worse < cfg.alpha else PASS,
                 float(cand.preferred - inc.preferred), test.p_worse,
                 f"fail if preferred less often with p < {cfg.alpha}",
                 f"candidate preferred in {cand.preferred} of {total} side-by-side verdicts")


def _request_checks(cand: Side, inc: Side, against_base: bool, cfg: CanarySettings,
                    figures: dict[str, Any], per_token: bool = False) -> list[Check]:
    """Error rate and latency (a whole answer's, and ``per_token`` each output token's too
    where at least ``min_requests`` answers a side said their tokens), once both sides
    have the minimum of requests."""
    err = two_proportions(cand.errors, cand.requests, inc.errors, inc.requests)
    checks = [Check(
        "error rate (two-proportion z)", FAIL if err.p_worse < cfg.alpha else PASS, err.z,
        err.p_worse, f"fail if higher with p < {cfg.alpha}",
        f"{err.candidate_rate:.2%} vs {err.incumbent_rate:.2%}")]
    figures["error_rate"] = {"candidate": err.candidate_rate, "incumbent": err.incumbent_rate}
    if cand.latencies_s and inc.latencies_s:
        # The base model answers without an adapter, so it is faster by nature: latency
        # against it is gated only when canary.base_p95_ratio says how much slower is fine.
        limit = cfg.base_p95_ratio if against_base else cfg.max_p95_ratio

        def slower(lat: Latency) -> bool:
            return limit is not None and lat.p_slower < cfg.alpha and lat.p95_ratio > limit

        whole = mann_whitney(cand.latencies_s, inc.latencies_s)
        figures["latency_p95_s"] = {"candidate": whole.candidate_p95_s,
                                    "incumbent": whole.incumbent_p95_s}
        detail = (f"p95 {whole.candidate_p95_s * 1000:.0f} ms vs "
                  f"{whole.incumbent_p95_s * 1000:.0f} ms (ratio {whole.p95_ratio:.2f})")
        lat, name, failed = whole, "latency (Mann-Whitney U)", slower(whole)
        cand_t, inc_t = (cand.per_token_s(), inc.per_token_s()) if per_token else ([], [])
        if min(len(cand_t), len(inc_t)) >= max(cfg.min_requests, 1):
            lat = mann_whitney(cand_t, inc_t)
            name, failed = "latency per output token (Mann-Whitney U)", failed and slower(lat)
            figures["latency_per_token_p95_s"] = {"candidate": lat.candidate_p95_s,
                                                  "incumbent": lat.incumbent_p95_s}
            detail = (f"per output token p95 {lat.candidate_p95_s * 1000:.1f} ms vs "
                      f"{lat.incumbent_p95_s * 1000:.1f} ms (ratio {lat.p95_ratio:.2f}); "
                      f"whole answers {detail}, p {whole.p_slower:.3g}; fails only if "
                      "slower both ways")
        checks.append(Check(
            name, FAIL if failed else PASS, lat.u, lat.p_slower,
            f"fail if slower with p < {cfg.alpha} and p95 ratio > {limit}" if limit else
            "not gated against the base model (canary.base_p95_ratio)", detail))
    return checks


def _verdict(checks: list[Check], enough: bool, sample: str, elapsed_s: float,
             cfg: CanarySettings) -> tuple[str, list[Check]]:
    """The verdict, and the check that explains a verdict of time (window or maximum);
    ``sample`` says what arrived, so a rollback for want of evidence says which side
    lacked it."""
    if any(c.outcome == FAIL for c in checks):
        return "rollback", []
    if not enough:
        if elapsed_s < cfg.max_window_s:
            return "hold", []
        return "rollback", [Check("maximum window", FAIL, elapsed_s, None,
                                  f"a verdict within {cfg.max_window_s:.0f}s",
                                  f"the minimum sample never arrived ({sample}): no evidence, "
                                  "no promotion")]
    if elapsed_s < cfg.window_s:
        return "hold", [Check("window", HOLD, elapsed_s, None, f">= {cfg.window_s:.0f}s",
                              "the window is still open")]
    return "promote", []


def hold_while_frozen(decision: Decision, frozen: bool, elapsed_s: float,
                      cfg: CanarySettings) -> Decision:
    """A promotion waits while promotions are frozen; past the maximum window it rolls
    back instead, so a canary never holds its share of users for ever."""
    if decision.verdict != "promote" or not frozen:
        return decision
    decision.verdict = "rollback" if elapsed_s >= cfg.max_window_s else "hold"
    return decision


@dataclass(frozen=True)
class Verdict:
    """One verdict on a served answer, as the gateway recorded it."""

    event_id: str
    request_id: str
    version: str | None
    rating: float | None
    correction: str | None
    completion: str
    user_id: str | None
    signature: str | None


def judged_verdicts(verdicts: Iterable[Verdict], key: bytes, max_per_user: int
                    ) -> list[tuple[str | None, float | None, str | None, str]]:
    """The verdicts a live window counts, one row per answer (version, rating, correction,
    the answer), in the order given. Pure.

    Only verdicts the gateway signed (anything else reached Kafka some other way); of
    those, the last per answer; of those, at most ``max_per_user`` per user (0: no cap),
    so one client rating everything cannot outweigh the rest.
    """
    last: dict[str, Verdict] = {}
    for v in verdicts:
        if signed_by_gateway(key, v.signature, v.event_id, v.request_id, v.version, v.rating,
                             v.user_id):
            last.pop(v.request_id, None)  # re-inserted: the order is the latest verdict's
            last[v.request_id] = v
    per_user: dict[str | None, int] = {}
    rows = []
    for v in last.values():
        seen = per_user.get(v.user_id, 0)
        if max_per_user and v.user_id is not None and seen >= max_per_user:
            continue
        per_user[v.user_id] = seen + 1
        rows.append((v.version, v.rating, v.correction, v.completion))
    return rows


@dataclass(frozen=True)
class Preference:
    """One side-by-side verdict, as the gateway recorded it."""

    event_id: str
    request_id: str
    version: str | None  # the version that answered the user
    chosen_version: str | None
    rejected_version: str | None
    user_id: str | None
    signature: str | None


def count_preferences(verdicts: Iterable[Preference], key: bytes, candidate: str,
                      incumbent: str | None, max_per_user: int) -> tuple[int, int]:
    """(verdicts the candidate won, verdicts the incumbent won) between exactly these two
    versions. Pure; counted as ratings are (:func:`judged_verdicts`): signed by the gateway
    (the chosen side included), the last per answer, at most ``max_per_user`` per user."""
    last: dict[str, Preference] = {}
    for v in verdicts:
        if {v.chosen_version, v.rejected_version} != {candidate, incumbent}:
            continue
        if signed_by_gateway(key, v.signature, v.event_id, v.request_id, v.version, None,
                             v.user_id, preference_extra(v.chosen_version, v.rejected_version)):
            last.pop(v.request_id, None)
            last[v.request_id] = v
    per_user: dict[str | None, int] = {}
    won = {candidate: 0, incumbent: 0}
    for v in last.values():
        seen = per_user.get(v.user_id, 0)
        if max_per_user and v.user_id is not None and seen >= max_per_user:
            continue
        per_user[v.user_id] = seen + 1
        won[v.chosen_version] += 1
    return won[candidate], won[incumbent]


def count_ratings(rows: Iterable[tuple[str | None, float | None, str | None, str]],
                  versions: Sequence[str | None], bad_below: float
                  ) -> dict[str | None, tuple[int, int]]:
    """(rated answers, bad ones) per version, from one row per rated answer:
    (version, last rating, last correction, the answer).

    A rating below ``bad_below`` is bad; an answer corrected to something else is bad too.
    Versions not in ``versions`` are left out.
    """
    out: dict[str | None, tuple[int, int]] = {v: (0, 0) for v in versions}
    for version, rating, correction, completion in rows:
        if version not in out:
            continue
        if rating is not None:
            bad = rating < bad_below
        else:
            bad = normalize_text(correction or "") != normalize_text(completion)
        rated, bads = out[version]
        out[version] = (rated + 1, bads + int(bad))
    return out


def summarise_shadow(rows: Sequence[tuple[str, str | None, str | None, str | None]]
                     ) -> dict[str, Any]:
    """How often the candidate's unseen answers agreed with production's and, where a
    label or correction came later, which side was right. One row per shadow pair:
    (production's answer, the candidate's, the label, the correction)."""
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
