"""The demo's two scenarios, pure: their sizes, the settings they run under, and which
intents and queries each phase uses.

:data:`SMALL` (the default of ``tuneloop demo``) and :data:`FULL` (``--full``) take the
same path; the full one serves about half the dataset's intents before the shift and
brings in 10 new ones, the small one 6 and 3. Every size scales with the number of
intents and nothing is tied to one dataset: intents are drawn at random (seeded).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from typing import Any

from tuneloop.runtime.cpu import split_cores
from tuneloop.services.demo.banking77 import Query


@dataclass(frozen=True)
class Scenario:
    """The demo's sizes and the settings (over the user's) it runs under."""

    old_share: float  # of all intents, served before the shift
    max_old: int
    new_intents: int
    history_per_intent: int  # labelled events the app sent before tuneloop
    golden_per_intent: int
    heldout_per_intent: int  # test-split queries per intent for before/after
    new_share: float  # of traffic after the shift
    steady_s: float
    users: int
    rate: float  # user requests per second, all users together
    label_share: float  # answers an agent labels
    drift_window: int  # current window of the drift check, events
    shift_timeout_s: float
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, table by table (nested dicts merge, the rest replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def to_toml(data: dict[str, Any]) -> str:
    """The TOML shapes settings use: scalars and lists, in tables nested to any depth
    (``[tasks."support-bot"]``)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    def key(k: str) -> str:
        return k if k.replace("_", "").isalnum() else json.dumps(k)

    def table(path: list[str], d: dict[str, Any]) -> list[str]:
        scalars = [f"{key(k)} = {value(v)}" for k, v in d.items() if not isinstance(v, dict)]
        out = ([f"\n[{'.'.join(key(p) for p in path)}]"] if path and scalars else []) + scalars
        for k, v in d.items():
            if isinstance(v, dict):
                out += table([*path, k], v)
        return out

    return "\n".join(table([], data)) + "\n"


def _settings(window: int, canary_window_s: int, min_requests: int, min_ratings: int,
              fresh_max_examples: int) -> dict[str, dict[str, Any]]:
    # On a CPU, vLLM and training each get their own cores: threads of the two spinning on
    # the same core slow both several times over (see tuneloop/runtime/cpu.py).
    cores = split_cores(os.cpu_count() or 1)
    split = {"serving": {"engine_cores": cores[0]},
             "training": {"cpu_cores": cores[1]}} if cores else {}
    return merge(split, {
        # Checks often enough to see a shift within a minute of enough traffic.
        "drift": {"interval_s": 60, "current_window_events": window},
        # A short live window sized to the traffic a CPU serves; half the users see it.
        # An inconclusive offline improvement is looked at again within minutes, on the
        # labelled answers that arrived meanwhile.
        "canary": {"window_s": canary_window_s, "max_window_s": 900, "poll_s": 10,
                   "offline_recheck_s": 90, "fresh_max_examples": fresh_max_examples,
                   "min_requests": min_requests, "min_ratings": min_ratings},
        "serving": {"canary_share": 0.5},
        # The demo shows the drift path; a retrain on label count alone is off.
        "loop": {"cooldown_s": 240, "retrain_min_new_labels": 0},
        # A larger test split: a small dataset still gives the offline gate enough new
        # examples to show an improvement (the golden set holds only what production knew).
        # A retrain continues from production: 10 train examples of each label it knows
        # keep that label (tuneloop/bench/RESULTS.md, forgetting), and the steps go to the new ones.
        "curation": {"split": [0.7, 0.1, 0.2], "known_label_train_cap": 10},
    })


FULL = Scenario(old_share=0.5, max_old=40, new_intents=10, history_per_intent=24,
                golden_per_intent=5, heldout_per_intent=10, new_share=0.5, steady_s=120,
                users=4, rate=1.5, label_share=0.6, drift_window=200, shift_timeout_s=4200,
                settings=_settings(200, 90, 40, 20, 80))
# The small scenario is sized to end within 25 minutes on two CPU cores (for labels; a
# reply task's larger sizes take longer, KIND_SIZES), where vLLM answers
# about two requests a second: its agent labels nine answers in ten, so the new intents
# have the examples a retrain waits for (loop.min_examples_per_new_label) about when the
# drift alarm comes, and the offline gate asks 40 of the newest labelled events.
SMALL = Scenario(old_share=0.5, max_old=6, new_intents=3, history_per_intent=40,
                 golden_per_intent=5, heldout_per_intent=20, new_share=0.5, steady_s=70,
                 users=4, rate=1.0, label_share=0.9, drift_window=180, shift_timeout_s=2400,
                 settings=_settings(180, 45, 25, 12, 40))


# Settings and sizes over a scenario's for one task kind. A reply is judged by sentence
# chrF against one reference, whose spread per example is several times a label's or a
# field's: two good replies share few characters, so a real gain of a few points needs a
# few hundred paired examples to show, and a retrain gains more on a new group the more of
# its replies it learns from (tuneloop/bench/RESULTS.md, "demo --task text"). The first
# retrain after a shift waits for three times the examples of each new group, the offline
# gate may use 120 newer labelled events (the small scenario's 40, the full one's 80; each
# at most once per prompt, none the candidate trained on), the before/after figures read
# twice the held-out queries of each group, and the loop has longer to promote.
KIND_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "text": {"loop": {"min_examples_per_new_label": 60},
             "canary": {"fresh_max_examples": 120}},
}
KIND_SIZES: dict[str, dict[str, Any]] = {
    "text": {"heldout_per_intent": 2, "shift_timeout_s": 1.5},  # factors of the scenario's
}


def for_kind(sc: Scenario, kind: str) -> Scenario:
    """``sc`` with the sizes of task ``kind`` (:data:`KIND_SIZES`, factors) over it."""
    factors = KIND_SIZES.get(kind, {})
    return replace(sc, **{name: type(getattr(sc, name))(getattr(sc, name) * factor)
                          for name, factor in factors.items()})


@dataclass(frozen=True)
class Plan:
    """Which intents are old and new, and the queries each phase sends or asks."""

    seed: int  # also seeds the history's event ids
    old: list[str]
    new: list[str]
    history: list[Query]  # the app's labelled history, before tuneloop
    steady: list[Query]  # users' traffic before the shift: other queries of the old intents
    shifted: list[Query]  # users' traffic after it: ``new_share`` from the new intents
    heldout_old: list[Query]  # test-split queries asked before and after
    heldout_new: list[Query]


def plan(sc: Scenario, intents: list[str], train: list[Query], test: list[Query],
         seed: int) -> Plan:
    """Draw the old and new intents and every phase's queries, reproducibly for ``seed``.

    Raises ``ValueError`` when ``train`` leaves no traffic for a phase (no query of the
    new intents, or none of the old ones beyond their history).
    """
    intents = list(intents)
    random.Random(seed).shuffle(intents)
    n_old = min(sc.max_old, max(2, round(len(intents) * sc.old_share)))
    old, new = intents[:n_old], intents[n_old:n_old + sc.new_intents]
    # Queries in a random order: a data file's order (by collection batch, say) must not
    # make the history and the later traffic of the same intents look different.
    train = list(train)
    random.Random(seed + 2).shuffle(train)
    history = pick(train, old, sc.history_per_intent)
    random.Random(seed + 3).shuffle(history)  # the app's history interleaves its intents
    # Steady traffic asks each old intent as often as the history does: a group with more
    # rows in the data file must not make steady traffic look like a shift (a service of
    # a dialogue set may have four times another's turns).
    steady = balanced(train, old, skip=sc.history_per_intent)
    # The shift asks each new intent alike: ``mix`` takes the first of these it needs, and
    # intent by intent that would be the first intents' queries and none of the last's.
    new_traffic = interleaved(train, new)
    if not new_traffic or not steady:
        raise ValueError(
            f"the training split leaves no traffic for a phase: {len(new_traffic)} queries of "
            f"the new intents, {len(steady)} of the old ones beyond the history of "
            f"{sc.history_per_intent} each; use a dataset with more queries per intent")
    return Plan(seed, old, new, history, steady, mix(new_traffic, steady, sc.new_share, seed),
                pick(test, old, sc.heldout_per_intent), pick(test, new, sc.heldout_per_intent))


def balanced(pool: list[Query], intents: list[str], skip: int = 0) -> list[Query]:
    """As many queries of each intent in ``pool`` (from ``skip``) as the rarest of them
    has, interleaved; none when one has none."""
    per = _by_intent(pool, intents, skip)
    n = min((len(qs) for qs in per), default=0)
    return [qs[i] for i in range(n) for qs in per]


def interleaved(pool: list[Query], intents: list[str]) -> list[Query]:
    """Every query of ``intents`` in ``pool``, one intent after another in turn, so that
    any first part of the list holds them evenly (until the rarer ones run out)."""
    per = _by_intent(pool, intents)
    n = max((len(qs) for qs in per), default=0)
    return [qs[i] for i in range(n) for qs in per if i < len(qs)]


def _by_intent(pool: list[Query], intents: list[str], skip: int = 0) -> list[list[Query]]:
    """Each intent's queries in ``pool``, in order, from ``skip``."""
    return [[q for q in pool if q.intent == name][skip:] for name in intents]


def pick(pool: list[Query], intents: list[str], per_intent: int, skip: int = 0) -> list[Query]:
    """Per intent in order, its queries of ``pool`` from ``skip``, at most ``per_intent``."""
    out: list[Query] = []
    for name in intents:
        out += [q for q in pool if q.intent == name][skip:skip + per_intent]
    return out


def mix(new: list[Query], old: list[Query], share: float, seed: int) -> list[Query]:
    """A traffic list with ``share`` of queries from ``new``, shuffled."""
    rng = random.Random(seed + 1)
    n = max(len(new), len(old))
    n_new = max(1, round(n * share))
    picked = [new[i % len(new)] for i in range(n_new)] + \
        [old[i % len(old)] for i in range(n - n_new)]
    rng.shuffle(picked)
    return picked
