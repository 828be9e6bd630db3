"""The split topology's layout (tuneloop.infra.split) and how bench scale counts shared
files: no role's home, settings file, caches or temporary folder is another's."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tuneloop.bench.scale import OpenFiles
from tuneloop.infra.split import ROLES, Split, is_split, split_settings
from tuneloop.runtime.settings import CONFIG_ENV, load_settings
from tuneloop.services.demo.scenario import merge, to_toml


def test_each_role_has_its_own_home_settings_caches_and_temporary_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "operator"
    home.mkdir()
    recipe = home / "recipe.yaml"
    recipe.write_text("rank: 8\n")
    (home / "slots.schema.json").write_text('{"type": "object"}')
    table = merge(split_settings(home), {
        "training": {"config": str(recipe)},
        "tasks": {"support-bot": {"kind": "json", "json_schema": "slots.schema.json"}}})
    config = home / "tuneloop.toml"
    config.write_text(to_toml(table))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    settings = load_settings({"home": home})
    assert settings.store.url is not None and settings.store.artifacts
    assert settings.store.snapshots and settings.loop.train_work_pool == "train"
    assert settings.serving.replicas == 2

    split = Split(settings)
    envs = {role: split.role_env(role) for role in ROLES}
    for key in ("TUNELOOP_HOME", CONFIG_ENV, "XDG_CACHE_HOME", "TMPDIR", "PREFECT_HOME",
                "HF_HOME"):
        values = [env[key] for env in envs.values()]
        assert len(set(values)) == len(ROLES), key
    for role, env in envs.items():
        role_home = split.role_home(role)
        assert env["TUNELOOP_HOME"] == str(role_home)
        for key in (CONFIG_ENV, "XDG_CACHE_HOME", "TMPDIR", "PREFECT_HOME"):
            assert Path(env[key]).is_relative_to(role_home), (role, key)
        copied = tomllib.loads(Path(env[CONFIG_ENV]).read_text())
        # The recipe the operator's file names under the operator's home is copied too.
        assert copied["training"]["config"] == str(role_home / "recipe.yaml")
        assert copied["store"] == table["store"]
        # A schema named beside the operator's file is found from the role's home too.
        schema = copied["tasks"]["support-bot"]["json_schema"]
        assert schema == str((home / "slots.schema.json").resolve())
        monkeypatch.setenv(CONFIG_ENV, env[CONFIG_ENV])
        assert load_settings().task.schema_document == {"type": "object"}
        monkeypatch.setenv(CONFIG_ENV, str(config))
        # The keys two roles check each other by are the same in every copy: the gateway
        # signs verdicts with the event key and the control worker's canary checks them.
        for key in ("event_key", "admin_key", "vllm_api_key", "user_id_key"):
            assert copied["serving"][key] == table["serving"][key], key
    assert is_split(home) and not is_split(tmp_path / "elsewhere")


def test_only_files_two_roles_opened_count_as_shared(tmp_path: Path) -> None:
    files = OpenFiles(tmp_path / "roles", tmp_path)
    files.opened["/a/one-role"].update({"gateway"})
    files.opened["/a/two-roles"].update({"gateway", "control"})
    files.opened["/a/train-and-its-replacement"].update({"train", "train-2"})
    assert files.shared() == {"/a/two-roles": ["control", "gateway"]}
