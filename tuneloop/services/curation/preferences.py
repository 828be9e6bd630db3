"""Corrections and side-by-side verdicts as preferences: a dataset's preference pairs. Pure.

Every correction of a served answer says two things: what the answer should have been
(an SFT target, :mod:`~tuneloop.services.curation.core`) and that it is better than what
was served. The second is a preference pair (chosen: the correction; rejected: the
served answer), kept with each dataset version for DPO (``training.objective``). So is
every side-by-side verdict a rater gave on an answer and the candidate's unseen answer to
the same request (chosen: the answer preferred).

A pair is left out, under the reason named by the constant, when the correction is the
served answer itself, the served answer is empty, the correction is not a target the
task accepts (a ``json`` correction its schema refuses), its prompt is golden, or a newer
pair has the same prompt. Pairs are scrubbed of PII like examples, and split train /
validation / test by a hash of their content, so a pair keeps its split across versions.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tuneloop.runtime.settings import CurationSettings, TaskSpec
from tuneloop.services.curation.core import (
    Candidate,
    Example,
    GoldenIndex,
    canonical_target,
    prompt_key,
)
from tuneloop.services.evaluation.metrics import normalize_text
from tuneloop.services.feedback.redaction import Redactor

SAME_ANSWER = "chosen answer equals the rejected one"
NOTHING_SERVED = "no rejected answer"
BAD_CORRECTION = "chosen answer not a target the task accepts"
GOLDEN = "golden prompt (exact or near)"
OLDER = "a newer pair has the prompt"
REASONS = (SAME_ANSWER, NOTHING_SERVED, BAD_CORRECTION, GOLDEN, OLDER)
SOURCES = ("correction", "side-by-side")


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for the chat ``messages`` (without an answer), ``chosen`` is better
    than ``rejected``."""

    pair_id: str
    source_event_id: str | None
    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str = "correction"
    split: str = "train"

    def to_row(self) -> dict[str, Any]:
        return {"pair_id": self.pair_id, "split": self.split,
                "source_event_id": self.source_event_id, "source": self.source,
                "messages": json.dumps(self.messages, ensure_ascii=False),
                "chosen": self.chosen, "rejected": self.rejected}


def pair_id(messages: Sequence[dict[str, str]], chosen: str, rejected: str) -> str:
    blob = json.dumps([list(messages), chosen, rejected], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PreferenceResult:
    pairs: list[PreferencePair]
    dropped: Counter[str] = field(default_factory=Counter)

    def report(self) -> dict[str, Any]:
        return {"kept": len(self.pairs),
                "dropped": {reason: self.dropped.get(reason, 0) for reason in REASONS},
                "splits": {s: sum(1 for p in self.pairs if p.split == s)
                           for s in ("train", "validation", "test")}}


def correction_pairs(candidates: Sequence[Candidate], golden: GoldenIndex,
                     cfg: CurationSettings, task: TaskSpec | None = None, *,
                     near_golden: frozenset[str] | set[str] = frozenset(),
                     held_out: dict[str, str] | None = None) -> PreferenceResult:
    """The preference pair of each corrected answer in ``candidates`` (see the module).

    ``near_golden``: event ids whose prompt is a near-duplicate of a golden one (left out).
    ``held_out``: the split of the event's own example where it is validation or test; its
    pair takes that split too, so DPO never trains on what the offline gate tests with.
    """
    task = task or TaskSpec()
    result = PreferenceResult([])
    seen: set[str] = set()
    for cand in sorted(candidates, key=lambda c: c.occurred_at, reverse=True):
        source = "side-by-side" if cand.preference else "correction"
        if cand.preference:
            correction = str(cand.preference.get("chosen") or "").strip()
            served = str(cand.preference.get("rejected") or "").strip()
        else:
            correction, served = (cand.correction or "").strip(), cand.completion.strip()
        if not correction:
            continue
        reason = _problem(correction, served, task)
        if reason is None:
            key = prompt_key(cand.prompt)
            if key in golden.keys or cand.event_id in golden.event_ids or \
                    cand.event_id in near_golden:
                reason = GOLDEN
            elif key in seen:
                reason = OLDER
            else:
                seen.add(key)
        if reason is not None:
            result.dropped[reason] += 1
            continue
        chosen = canonical_target(correction, task) if task.kind == "json" else correction
        pair = _pair(cand, str(chosen), served, task, cfg, source)
        if held_out and cand.event_id in held_out:
            pair = replace(pair, split=held_out[cand.event_id])
        result.pairs.append(pair)
    return result


def _problem(correction: str, served: str, task: TaskSpec) -> str | None:
    if not served:
        return NOTHING_SERVED
    if normalize_text(correction) == normalize_text(served):
        return SAME_ANSWER
    if task.kind == "json" and canonical_target(correction, task) is None:
        return BAD_CORRECTION
    return None


def _pair(cand: Candidate, chosen: str, rejected: str, task: TaskSpec,
          cfg: CurationSettings, source: str) -> PreferencePair:
    clean = Redactor()
    turns = [{"role": m["role"], "content": clean(m["content"])} for m in cand.messages]
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if task.system_prompt and not any(m["role"] == "system" for m in turns):
        turns.insert(0, {"role": "system", "content": task.system_prompt})
    chosen, rejected = clean(chosen), clean(rejected)
    pid = pair_id(turns, chosen, rejected)
    return PreferencePair(pid, cand.event_id, turns, chosen, rejected, source,
                          split_of(pid, cfg))


def split_of(pid: str, cfg: CurationSettings) -> str:
    """A pair's split from its id: the same pair lands in the same split in every version."""
    _, validation, test = cfg.split
    u = int(pid[:8], 16) / 2**32
    return "test" if u < test else "validation" if u < test + validation else "train"


def carried_pairs(unlearned: Sequence[PreferencePair], carried: Sequence[Example],
                  fresh: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The preference pairs of ``carried`` examples (see ``carry_over``), each in its
    example's split; a prompt the fresh pairs or an earlier carried pair has is left out."""
    split_of = {e.source_event_id: e.split for e in carried if e.source_event_id}
    seen = {prompt_key(_prompt(p)) for p in fresh}
    out: list[PreferencePair] = []
    for pair in unlearned:
        key = prompt_key(_prompt(pair))
        if pair.source_event_id not in split_of or key in seen:
            continue
        seen.add(key)
        out.append(replace(pair, split=split_of[pair.source_event_id]))
    return out


def _prompt(pair: PreferencePair) -> str:
    """The last user turn of a pair's chat."""
    return next((m["content"] for m in reversed(pair.messages) if m.get("role") == "user"), "")
