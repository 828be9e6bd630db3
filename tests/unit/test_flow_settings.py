"""Flows load their own settings from plain overrides, never take a Settings, and refuse
to take a secret as a parameter (Prefect stores and shows every flow parameter)."""

from __future__ import annotations

import inspect

import pytest

from tuneloop.flows.common import SecretOverride, flow_settings, secret_settings


def test_the_admin_key_is_a_secret_setting() -> None:
    assert "serving.admin_key" in secret_settings()


@pytest.mark.parametrize("name", ["serving.admin_key", "serving"])
def test_an_override_naming_a_secret_is_refused(name: str) -> None:
    with pytest.raises(SecretOverride, match="serving.admin_key"):
        flow_settings({name: "leaked" if "." in name else {"admin_key": "leaked"}})


def test_overrides_apply_over_the_file_and_environment() -> None:
    settings = flow_settings({"curation.replay_share": 0.3, "drift.current_window_events": 200})
    assert settings.curation.replay_share == 0.3
    assert settings.drift.current_window_events == 200
    assert flow_settings(None).curation.replay_share == flow_settings({}).curation.replay_share


def test_no_flow_of_the_loop_takes_a_settings_object() -> None:
    from tuneloop.flows.canary import canary, check_production
    from tuneloop.flows.curate import curate_flow
    from tuneloop.flows.drift import detect_drift_flow
    from tuneloop.flows.retrain import retrain, train_adapter

    for flow in (detect_drift_flow, curate_flow, retrain, train_adapter, canary, check_production):
        parameters = inspect.signature(flow.fn).parameters
        assert "settings" not in parameters, flow.name
        assert all("Settings" not in str(p.annotation) for p in parameters.values()), flow.name
        assert "overrides" in parameters, flow.name
