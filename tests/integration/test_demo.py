"""End to end: ``tuneloop demo`` (the default, small scenario), the loop running itself on
the real embedded stack. The run starts with the test session (tests/conftest.py).

Its own tansu broker, Prefect server, worker, long-running ingest, gateway and vLLM, in a
temporary home with free ports; the official ``openai`` client as the users. No person
acts between the shift and the promotion: the drift check, the retrain and the canary
are triggered by Prefect events. The default scenario is ``--full``'s with fewer intents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.stack_env import DemoRun

pytestmark = pytest.mark.integration

# The goals' margin for old intents, in macro-F1 points.
OLD_MARGIN_POINTS = 2.0


@pytest.mark.timeout(3400)  # the whole loop, end to end; the command's own limit is 3300 s
def test_demo_learns_the_new_intents_unattended(demo_run: DemoRun) -> None:
    # Started with the session (tests/conftest.py): the tests that need no vLLM of their
    # own ran beside it.
    code, stdout, stderr = demo_run.wait(timeout_s=3300)
    out = stdout + stderr
    assert code == 0, out[-6000:]
    result = json.loads((demo_run.home / "demo" / "reports" / "demo.json").read_text())
    figures = dict(line.removeprefix("FIGURE ").split("=") for line in stdout.splitlines()
                   if line.startswith("FIGURE "))
    assert set(figures) == {"new_intents_macro_f1_before", "new_intents_macro_f1_after",
                            "old_intents_macro_f1_delta", "shift_to_promotion_s"}

    # The loop promoted a new version after the shift, with no step in between.
    assert result["bootstrap_version"] and result["promoted_version"], out[-6000:]
    assert result["promoted_version"] != result["bootstrap_version"]
    # It learned the new intents, and the old ones held within the margin.
    before, after = result["before"], result["after"]
    scores = {"before": before, "after": after, "old delta": result["old_intents_delta"]}
    assert after["new intents"]["macro_f1"] > before["new intents"]["macro_f1"] + 0.3, scores
    # The old intents are read on the same held-out queries before and after: one query
    # in a hundred moves macro-F1 by a point or more, so a fall counts as a regression when
    # it is beyond the margin with p < 0.05 (paired bootstrap over the queries).
    old = result["old_intents_delta"]
    assert old["margin_points"] == OLD_MARGIN_POINTS
    assert old["p_fell_beyond_margin"] >= 0.05, scores
    # The drift alarm named the intents that arrived.
    assert result["named_new_intents"], result["drift_clusters"]
    # Steady traffic of the same intents raised no alarm and started no retrain.
    assert result["steady_drift_alarms"] == 0 and result["steady_retrains"] == 0, result
    assert result["served_failures"] == 0
    assert Path(result["report"]).read_text().count("<img") >= 4
