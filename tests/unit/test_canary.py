"""The canary's tests and verdicts, on hand-built answers."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tuneloop.runtime.settings import CanarySettings
from tuneloop.services.canary.core import (
    Check,
    Decision,
    Paired,
    Plan,
    another_look,
    combine,
    golden_checks,
    improvement_checks,
    known_label_checks,
    macro_f1_bootstrap,
    only_improvement_holds,
)
from tuneloop.services.canary.live import (
    Side,
    count_ratings,
    hold_while_frozen,
    live_decision,
    summarise_shadow,
)
from tuneloop.services.canary.stats import holm, mann_whitney, mcnemar, paired_bootstrap, two_proportions
from tuneloop.services.evaluation.metrics import evaluate_predictions

LABELS = ["card_arrival", "lost_card", "top_up", "refund", "pin_blocked", "exchange_rate"]
CFG = CanarySettings(bootstrap_resamples=500)


def pairs(n_per_label: int, inc_acc: float, cand_acc: float, seed: int = 0,
          cand_wrong: str | None = None) -> Paired:
    """Answers right with the given accuracy; wrong answers name another label."""
    rng = random.Random(seed)
    labels = [lab for lab in LABELS for _ in range(n_per_label)]

    def answer(label: str, acc: float, wrong: str | None = None) -> str:
        if rng.random() < acc:
            return label.replace("_", " ").title()
        return wrong or rng.choice([x for x in LABELS if x != label])

    return Paired(references=labels, labels=list(labels),
                  incumbent=[answer(lab, inc_acc) for lab in labels],
                  candidate=[answer(lab, cand_acc, cand_wrong) for lab in labels])


def test_mcnemar_counts_discordant_pairs_only() -> None:
    inc = [True] * 20 + [False] * 10
    cand = [True] * 20 + [True] * 10
    result = mcnemar(inc, cand)
    assert (result.only_candidate, result.only_incumbent) == (10, 0)
    assert result.p_better == pytest.approx(0.5 ** 10)
    assert result.p_worse == 1.0
    assert mcnemar(inc, inc).p_better == 1.0
    with pytest.raises(ValueError, match="pair them"):
        mcnemar([True], [True, False])


def test_holm_adjusts_in_input_order() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []


def test_two_proportions_and_mann_whitney() -> None:
    worse = two_proportions(30, 100, 10, 100)
    assert worse.p_worse < 0.001 and worse.z > 0
    assert two_proportions(0, 50, 0, 50).p_worse == 1.0
    lat = mann_whitney([0.2] * 50, [0.1] * 50)
    assert lat.p_slower < 0.001 and lat.p95_ratio == pytest.approx(2.0)


def test_the_bootstrap_measures_the_macro_f1_of_the_evaluation_module() -> None:
    p = pairs(8, 0.6, 0.7, seed=3)
    labels = [str(g) for g in p.labels]
    boot = macro_f1_bootstrap(labels, p.incumbent, p.candidate, 0.05, 0.05, resamples=50)
    before = evaluate_predictions(p.incumbent, p.references, p.labels).macro_f1
    after = evaluate_predictions(p.candidate, p.references, p.labels).macro_f1
    assert before is not None and after is not None
    assert boot.delta == pytest.approx(after - before)
    figures = golden_checks(p, CFG)[1]["golden_macro_f1"]
    assert (figures["incumbent"], figures["candidate"]) == pytest.approx((before, after))
    with pytest.raises(ValueError, match="pair them"):
        macro_f1_bootstrap(labels, p.incumbent[:-1], p.candidate, 0.05, 0.05)


def test_paired_bootstrap_sees_no_difference_between_equal_versions() -> None:
    right = np.array([1.0, 0.0] * 20)
    boot = paired_bootstrap(lambda i: float(right[i].mean()), lambda i: float(right[i].mean()),
                            40, margin=0.05, alpha=0.05, resamples=300)
    assert boot.delta == 0 and boot.p_beyond_margin == 1.0


def test_golden_gate_rejects_flipped_labels_and_passes_an_equal_candidate() -> None:
    flipped = pairs(6, 0.9, 0.0, cand_wrong="refund")
    checks, figures = golden_checks(flipped, CFG)
    assert combine(checks) == "reject"
    assert figures["golden_macro_f1"]["candidate"] < figures["golden_macro_f1"]["incumbent"]
    same = pairs(6, 0.8, 0.8, seed=1)
    same = Paired(same.references, same.labels, same.incumbent, list(same.incumbent))
    assert combine(golden_checks(same, CFG)[0]) == "pass"


def test_golden_gate_holds_a_drop_beyond_the_margin_that_noise_explains() -> None:
    # Four answers of 36 change for the worse: beyond a 0.05 margin, not significantly.
    base = pairs(6, 1.0, 1.0)
    cand = list(base.incumbent)
    for i in (0, 12, 24, 30):
        cand[i] = "something else"
    checks, _ = golden_checks(Paired(base.references, base.labels, base.incumbent, cand), CFG)
    assert combine(checks) == "hold", [c.line() for c in checks]


def test_one_label_collapsing_is_a_regression_even_if_the_average_holds() -> None:
    cfg = CanarySettings(bootstrap_resamples=500, golden_margin=0.5)
    base = pairs(12, 1.0, 1.0)
    cand = ["refund" if lab == "lost_card" else a for a, lab in
            zip(base.incumbent, base.labels, strict=True)]
    checks, figures = golden_checks(Paired(base.references, base.labels, base.incumbent, cand), cfg)
    failed = [c for c in checks if c.outcome == "fail"]
    assert [c.name for c in failed] == ["golden label lost_card (McNemar, Holm)"]
    assert figures["golden_per_label"]["lost_card"]["candidate_f1"] == 0


def test_a_label_too_thin_in_the_golden_set_to_fail_fails_on_its_test_examples_too() -> None:
    # Production knew four labels; the candidate learned two new ones and mistakes
    # lost_card for one of them. Five golden examples a label cannot show it; pooled with
    # the test split's examples of the known labels, the collapse is significant.
    known = ["card_arrival", "lost_card", "top_up", "refund"]

    def answers(labels: list[str]) -> tuple[list[str], list[str]]:
        # The incumbent misses every other example of the other labels, which the
        # candidate gets right: on the golden set it is better on average.
        inc = [lab if lab == "lost_card" or (lab in known and i % 2) else "unsure"
               for i, lab in enumerate(labels)]
        cand = ["card_linking" if lab == "lost_card" else lab for lab in labels]
        return inc, cand

    gold_labels = [lab for lab in known for _ in range(5)]
    inc, cand = answers(gold_labels)
    golden = Paired(list(gold_labels), list(gold_labels), inc, cand)
    golden_only, _ = golden_checks(golden, CFG)
    assert "fail" not in {c.outcome for c in golden_only}, [c.line() for c in golden_only]

    test_labels = [lab for lab in known + ["card_linking", "top_up_limits"] for _ in range(8)]
    inc, cand = answers(test_labels)
    # An unlabelled example (a test example with a correction only) is not pooled.
    test = Paired([*test_labels, "x"], [*test_labels, None], [*inc, "x"], [*cand, "y"])
    checks, figures = known_label_checks(golden, test, CFG)
    assert [(c.name, c.outcome) for c in checks] == [
        ("known label lost_card (golden + test + newer, McNemar, Holm)", "fail")]
    assert figures["known_label_n"] == 20 + 4 * 8  # the new labels' examples are not pooled
    assert figures["known_per_label"]["lost_card"]["candidate_f1"] == 0
    assert set(figures["known_per_label"]) == set(known)
    # The same candidate without the mistake: nothing to say.
    fixed = Paired(test.references, test.labels, test.incumbent, list(test.labels))
    fixed_golden = Paired(golden.references, golden.labels, golden.incumbent, list(golden.labels))
    assert known_label_checks(fixed_golden, fixed, CFG)[0] == []
    # Free text and json have no labels to pool.
    free = Paired(["a"], [None], ["a"], ["b"], kind="text")
    assert known_label_checks(free, free, CFG) == ([], {})


def test_test_split_gate_needs_a_significant_improvement() -> None:
    assert combine(improvement_checks(pairs(6, 0.2, 0.9), CFG)[0]) == "pass"
    assert combine(improvement_checks(pairs(6, 0.9, 0.2), CFG)[0]) == "reject"
    equal = pairs(6, 0.7, 0.7, seed=2)
    assert combine(improvement_checks(equal, CFG)[0]) == "hold"
    assert combine(improvement_checks(Paired([], [], [], []), CFG)[0]) == "hold"


def test_each_look_tests_the_improvement_at_alpha_over_the_looks() -> None:
    # 11 discordant pairs for the candidate, 4 for the incumbent: p = 0.059 one-sided.
    right = [True] * 11 + [False] * 4 + [True] * 40
    inc = [False] * 11 + [True] * 4 + [True] * 40
    refs = [f"a{i}" for i in range(len(right))]
    p = Paired(refs, [None] * len(refs), [r if ok else "x" for r, ok in zip(refs, inc, strict=True)],
               [r if ok else "x" for r, ok in zip(refs, right, strict=True)])
    one_look = CanarySettings(offline_looks=1, alpha=0.1)
    assert combine(improvement_checks(p, one_look)[0]) == "pass"
    checks, figures = improvement_checks(p, CanarySettings(offline_looks=3, alpha=0.1), 15, 2)
    assert combine(checks) == "hold" and "p < 0.0333" in checks[0].threshold
    assert figures["fresh_n"] == 15 and figures["test_n"] == 40 and figures["look"] == 2
    # Held by the improvement test alone: another look on more data can settle it.
    held = Decision("offline", "v2", "v1", "hold", checks, figures)
    assert only_improvement_holds(held)
    looks = CanarySettings(offline_looks=3, alpha=0.1)
    assert another_look(held, looks) == 3
    last = Decision("offline", "v2", "v1", "hold", checks, {**figures, "look": 3})
    assert another_look(last, looks) is None
    golden_hold = Check("golden macro-F1 (paired bootstrap)", "hold", -0.1, 0.08, "", "")
    both = Decision("offline", "v2", "v1", "hold", [golden_hold, *checks], figures)
    assert not only_improvement_holds(both) and another_look(both, looks) is None


def test_free_text_is_judged_by_exact_match() -> None:
    refs = [f"answer {i}" for i in range(30)]
    p = Paired(refs, [None] * 30, ["nope"] * 30, list(refs))
    assert combine(improvement_checks(p, CFG)[0]) == "pass"
    checks, figures = golden_checks(p, CFG)
    assert combine(checks) == "pass" and "golden_per_label" not in figures


def side(requests: int, errors: int = 0, latency: float = 0.1, ratings: int = 0,
         bad: int = 0, seed: int = 0) -> Side:
    rng = random.Random(seed)
    return Side(requests, errors, [latency * rng.uniform(0.8, 1.2) for _ in range(requests - errors)],
                ratings, bad)


LIVE = CanarySettings(window_s=60, max_window_s=120, min_requests=50, min_ratings=20)


def test_live_gate_holds_until_the_sample_and_the_window_are_there() -> None:
    few = live_decision("v2", "v1", side(10), side(90), 30, LIVE)
    assert few.verdict == "hold"
    early = live_decision("v2", "v1", side(60, ratings=25), side(400, ratings=80, seed=1), 30, LIVE)
    assert early.verdict == "hold"
    done = live_decision("v2", "v1", side(60, ratings=25), side(400, ratings=80, seed=1), 61, LIVE)
    assert done.verdict == "promote", done.reason
    starved = live_decision("v2", "v1", side(10), side(90), 121, LIVE)
    assert starved.verdict == "rollback" and "minimum sample" in starved.reason
    # The rollback says which side lacked the evidence.
    assert "requests 10/90, ratings 0/0 (candidate/production)" in starved.reason


def test_live_gate_rolls_back_on_bad_ratings_errors_or_latency() -> None:
    rated_down = live_decision("v2", "v1", side(60, ratings=30, bad=20),
                               side(400, ratings=100, bad=10, seed=1), 20, LIVE)
    assert rated_down.verdict == "rollback"
    assert rated_down.figures["bad_rating_rate"]["candidate"] == pytest.approx(2 / 3)
    failing = live_decision("v2", "v1", side(60, errors=15, ratings=25),
                            side(400, ratings=80, seed=1), 20, LIVE)
    assert failing.verdict == "rollback" and "error rate" in failing.reason
    slow = live_decision("v2", "v1", side(60, latency=0.5, ratings=25),
                         side(400, ratings=80, seed=1), 20, LIVE)
    assert slow.verdict == "rollback" and "latency" in slow.reason
    # Slower, but within the allowed p95 ratio: not a regression.
    bit_slower = live_decision("v2", "v1", side(60, latency=0.12, ratings=25),
                               side(400, ratings=80, seed=1), 61, LIVE)
    assert bit_slower.verdict == "promote", bit_slower.reason


def test_latency_against_the_base_model_is_gated_only_when_configured() -> None:
    slow, base = side(60, latency=0.5, ratings=25), side(400, ratings=80, seed=1)
    first = live_decision("v1", None, slow, base, 61, LIVE)
    assert first.verdict == "promote", first.reason
    assert "not gated" in next(c.threshold for c in first.checks if "latency" in c.name)
    gated = LIVE.model_copy(update={"base_p95_ratio": 3.0})
    assert live_decision("v1", None, slow, base, 61, gated).verdict == "rollback"


def test_a_text_alias_gates_latency_per_output_token() -> None:
    # The candidate writes replies three times as long, at the same speed a token.
    rng = random.Random(0)

    def replies(n: int, tokens: int, per_token_s: float, first_s: float = 0.05) -> Side:
        counts = [max(1, int(tokens * rng.uniform(0.7, 1.3))) for _ in range(n)]
        return Side(requests=n, latencies_s=[first_s + k * per_token_s * rng.uniform(0.9, 1.1)
                                             for k in counts], ratings=25, tokens=counts)

    longer, terse = replies(60, 45, 0.02), replies(400, 15, 0.02)
    whole = live_decision("v2", "v1", longer, terse, 61, LIVE)
    assert whole.verdict == "rollback" and "latency (Mann-Whitney U)" in whole.reason
    text = live_decision("v2", "v1", longer, terse, 61, LIVE, per_token=True)
    assert text.verdict == "promote", text.reason
    check = next(c for c in text.checks if "latency" in c.name)
    assert check.name == "latency per output token (Mann-Whitney U)"
    assert "whole answers p95" in check.detail and text.figures["latency_per_token_p95_s"]
    # Slower a token and for the whole answer: a serving regression.
    slow = live_decision("v2", "v1", replies(60, 15, 0.08), terse, 61, LIVE, per_token=True)
    assert slow.verdict == "rollback" and "per output token" in slow.reason
    # Fewer tokens in as much time: slower a token, no slower to read (the time before the
    # first token weighs on each of fewer tokens).
    brief = live_decision("v2", "v1", replies(60, 4, 0.02, first_s=0.25), terse, 61, LIVE,
                          per_token=True)
    assert brief.verdict == "promote", brief.reason
    assert brief.figures["latency_per_token_p95_s"]["candidate"] > \
        2 * brief.figures["latency_per_token_p95_s"]["incumbent"]
    # Answers that did not say their tokens (or too few did): the whole answers decide.
    for said in ([], longer.tokens[:10] + [None] * 50):
        unknown = live_decision("v2", "v1", replace(longer, tokens=said), terse, 61, LIVE,
                                per_token=True)
        assert unknown.verdict == "rollback" and "latency (Mann-Whitney U)" in unknown.reason


def test_ratings_not_required_when_min_ratings_is_zero() -> None:
    cfg = CanarySettings(window_s=60, max_window_s=120, min_requests=50, min_ratings=0)
    assert live_decision("v2", None, side(60), side(60, seed=1), 61, cfg).verdict == "promote"


def test_a_freeze_holds_a_promotion_until_the_maximum_window() -> None:
    def promoted() -> Decision:
        return live_decision("v2", "v1", side(60, ratings=25), side(400, ratings=80, seed=1),
                             61, LIVE)

    assert hold_while_frozen(promoted(), False, 61, LIVE).verdict == "promote"
    assert hold_while_frozen(promoted(), True, 61, LIVE).verdict == "hold"
    assert hold_while_frozen(promoted(), True, 121, LIVE).verdict == "rollback"
    rolled = live_decision("v2", "v1", side(10), side(90), 121, LIVE)
    assert hold_while_frozen(rolled, True, 121, LIVE).verdict == "rollback"


def test_the_plan_says_where_a_rerun_goes_on() -> None:
    def plan(state: str, freeze: str | None = None) -> Plan:
        return Plan("v2", state, "v1", freeze, None)

    assert plan("candidate").step == "offline"
    assert plan("candidate", "golden score fell").step == "frozen"
    assert plan("canary", "golden score fell").step == "live"  # the window holds instead
    assert plan("production").step == plan("rejected").step == "done"
    frozen = plan("candidate", "golden score fell").frozen()
    assert (frozen.stage, frozen.verdict, frozen.figures) == (
        "offline", "frozen", {"freeze": "golden score fell"})


def test_ratings_count_the_last_verdict_and_corrections_to_something_else() -> None:
    rows = [("v2", 1.0, None, "refund"), ("v2", 5.0, None, "refund"),
            ("v2", None, "  Refund ", "refund"), ("v2", None, "top_up", "refund"),
            (None, 2.0, None, "x"), ("v9", 1.0, None, "y")]
    assert count_ratings(rows, ["v2", None], bad_below=3) == {"v2": (4, 2), None: (1, 1)}


def test_the_shadow_summary_says_which_side_was_right() -> None:
    rows = [("refund", "Refund", "refund", None), ("refund", "top_up", None, "top_up"),
            ("lost_card", None, None, None)]
    assert summarise_shadow(rows) == {"pairs": 3, "agreement": 1 / 3, "with_truth": 2,
                                      "production_right": 1, "candidate_right": 2}
    assert summarise_shadow([])["agreement"] is None


def test_the_live_window_counts_signed_verdicts_the_last_per_answer_one_voice_per_user() -> None:
    from tuneloop.services.canary.live import Verdict, judged_verdicts
    from tuneloop.services.feedback.signing import event_signature

    key = b"k" * 32

    def verdict(i: int, request: str, rating: float, user: str, sign: bool = True) -> Verdict:
        sig = event_signature(key, f"e{i}", request, "v2", rating, user) if sign else "0" * 64
        return Verdict(f"e{i}", request, "v2", rating, None, "answer", user, sig)

    rows = judged_verdicts([
        verdict(1, "r1", -1, "alice"), verdict(2, "r1", 1, "alice"),  # the last wins
        verdict(3, "r2", 1, "bob"),
        verdict(4, "r3", -1, "mallory"), verdict(5, "r4", -1, "mallory"),  # one voice
        verdict(6, "r5", -1, "eve", sign=False),  # not the gateway's
        Verdict("e7", "r6", "v2", -1, None, "answer", "eve",
                event_signature(key, "e7", "r6", "v2", 1, "eve")),  # signed +1, says -1
    ], key, max_per_user=1)
    assert [r[1] for r in rows] == [1, 1, -1]
    assert len(judged_verdicts([verdict(4, "r3", -1, "m"), verdict(5, "r4", -1, "m")], key,
                               max_per_user=0)) == 2


def test_a_candidate_the_gateway_cannot_load_ends_its_window_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway takes a candidate it cannot load off the route (production serves
    everyone): no more evidence would come, so the look says so instead of waiting out
    the maximum window. A candidate moved for another reason, or a gateway that cannot
    answer, is left to the window. (The gateway's admin answers are given here: the
    gateway's own routing around is tested on the real stack, tests/integration.)"""
    from tuneloop.runtime.settings import load_settings
    from tuneloop.serving import control
    from tuneloop.serving.canary.live import off_route

    settings = load_settings({"home": tmp_path})
    alias = settings.serving.alias
    answers: list[object] = []

    def state(self: object) -> dict[str, object]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    monkeypatch.setattr(control.GatewayAdmin, "state", state)
    routed = {"routes": [{"alias": alias, "production": "v1", "candidate": "v2"}], "errors": []}
    around = {"routes": [{"alias": alias, "production": "v1", "candidate": None}],
              "errors": [{"alias": alias, "version": "v2",
                          "error": "adapter_model.safetensors differs from its manifest"}]}
    moved = {"routes": [{"alias": alias, "production": "v1", "candidate": None}], "errors": []}
    answers += [routed, around, moved, control.GatewayError(0, "unreachable")]
    assert off_route(settings, "v2") is None
    why = off_route(settings, "v2")
    assert why is not None and "cannot load (adapter_model.safetensors differs" in why
    assert off_route(settings, "v2") is None
    assert off_route(settings, "v2") is None


def test_a_look_at_a_holding_window_rolls_back_a_candidate_taken_off_the_route(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Holding for want of a sample, the look asks the gateway's route: a candidate it
    took off is rolled back at once, the reason saying why; one still routed holds."""
    from tuneloop.runtime.settings import load_settings
    from tuneloop.services.canary.core import Plan
    from tuneloop.serving.canary import live as serving_live

    settings = load_settings({"home": tmp_path})
    few = (Side(requests=3, ratings=1), Side(requests=40, ratings=20))
    monkeypatch.setattr(serving_live, "window", lambda *a: few)
    gone: list[str | None] = [None, "the gateway took v2 off support-bot's route: it cannot "
                              "load (tampered)"]
    monkeypatch.setattr(serving_live, "off_route", lambda *a: gone.pop(0))
    plan = Plan("v2", "canary", "v1", None, None)
    held, _ = serving_live.look(settings, plan, time.time() - 30)
    assert held.verdict == "hold"
    ended, _ = serving_live.look(settings, plan, time.time() - 30)
    assert ended.verdict == "rollback"
    assert "on the gateway's route: fail" in ended.reason and "cannot load (tampered)" in \
        ended.reason
