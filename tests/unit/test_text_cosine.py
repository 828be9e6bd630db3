"""A text task's answers are also judged by their cosine similarity with the reference
under the deployed embedding model (the real all-MiniLM-L6-v2), in the training report,
the offline gate's figures and the nightly check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.runtime.settings import Settings, TaskSpec, load_settings
from tuneloop.services.canary.core import Paired
from tuneloop.services.curation import golden
from tuneloop.services.curation.core import Example, example_id
from tuneloop.services.store.database import Store

REFERENCES = ["Your card will arrive within five working days.",
              "I have booked a table for two at eight tonight."]
OFF_TOPIC = ["The weather in Oslo is cold.", "Please restart the router."]


def text_settings(tmp_path: Path) -> Settings:
    return load_settings({"home": tmp_path, "tasks.support-bot.kind": "text"})


def example(prompt: str, answer: str) -> Example:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Example(example_id(messages), None, None, messages, prompt, answer)


def test_the_offline_gate_records_both_versions_task_figures_with_the_cosine(
        tmp_path: Path) -> None:
    from tuneloop.serving.canary.offline import both_task_figures

    settings = text_settings(tmp_path)
    pairs = Paired(REFERENCES, [None, None], OFF_TOPIC, list(REFERENCES), kind="text")
    figures = both_task_figures(settings, pairs)
    assert figures is not None and set(figures) == {"incumbent", "candidate"}
    assert figures["candidate"]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert figures["incumbent"]["cosine"] < 0.5
    assert figures["candidate"]["rouge_l"] == 1.0 > figures["incumbent"]["rouge_l"]
    # Labels are judged by their checks alone.
    assert both_task_figures(load_settings({"home": tmp_path}), pairs) is None
    # A json reference that is not an object leaves the figures out rather than failing
    # the gate (its checks say why).
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    json_settings = load_settings({"home": tmp_path, "tasks.support-bot.kind": "json",
                                   "tasks.support-bot.json_schema": str(schema)})
    objects = ['{"a": 1}', '{"a": 2}']
    good = Paired(objects, [None, None], objects, objects, kind="json",
                  schema={"type": "object"})
    figures = both_task_figures(json_settings, good)
    assert figures is not None and figures["candidate"]["object_exact_match"] == 1.0
    bad = Paired(["card_arrival", '{"a": 2}'], [None, None], objects, objects, kind="json",
                 schema={"type": "object"})
    assert both_task_figures(json_settings, bad) is None


def test_the_nightly_check_of_a_text_alias_records_the_cosine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's answers are given here; asking it is tested on the real stack."""
    from tuneloop.serving.canary import production

    settings = text_settings(tmp_path)
    monkeypatch.setattr(production, "answers",
                        lambda _s, _v, gold: [OFF_TOPIC[i] for i in range(len(gold))])
    with Store.of(settings).connect() as con:
        golden.add(con, [example(f"q{i}", r) for i, r in enumerate(REFERENCES)], cap=100)
    decision = production.check_production(settings)
    assert decision.figures["kind"] == "text"
    assert 0 <= decision.figures["task_figures"]["cosine"] < 0.5


def test_the_training_report_of_a_text_task_has_the_cosine(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Generation is given here (the training tests generate with a real model)."""
    from tuneloop.training import evaluate as training_evaluate
    from tuneloop.training.dataset import ChatExample
    from tuneloop.training.pipeline import Workspace

    settings = text_settings(tmp_path)
    workspace = Workspace.of(settings)
    assert Workspace.of(load_settings({"home": tmp_path})).embed() is None
    embed = workspace.embed()
    assert embed is not None
    monkeypatch.setattr(training_evaluate, "generate_answers",
                        lambda *_a, **_k: list(REFERENCES))
    examples = [ChatExample(str(i), ({"role": "user", "content": "q"},
                                     {"role": "assistant", "content": r}), r)
                for i, r in enumerate(REFERENCES)]
    report, _ = training_evaluate.evaluate_examples(None, None, examples, task=settings.task,
                                                    embed=embed)
    assert report.figures["cosine"] == pytest.approx(1.0, abs=1e-4)
    without, _ = training_evaluate.evaluate_examples(None, None, examples,
                                                     task=TaskSpec(kind="text"))
    assert "cosine" not in without.figures
