from pathlib import Path

import pytest
from pydantic import ValidationError

from tuneloop.runtime.settings import SettingsError, load_settings


def test_precedence_file_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tuneloop.toml"
    config.write_text('[kafka]\nbootstrap_servers = "file:1"\ngroup_id = "from-file"\n'
                      '[ingest]\nbatch_size = 7\n')
    monkeypatch.setenv("TUNELOOP_CONFIG", str(config))
    monkeypatch.delenv("TUNELOOP_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    assert load_settings().kafka.bootstrap_servers == "file:1"
    monkeypatch.setenv("TUNELOOP_KAFKA__BOOTSTRAP_SERVERS", "env:2")
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "env:2"
    assert settings.kafka.group_id == "from-file"
    settings = load_settings({"kafka.bootstrap_servers": "flag:3"})
    assert settings.kafka.bootstrap_servers == "flag:3"
    # An override replaces one knob, not the whole section.
    assert settings.kafka.group_id == "from-file"
    assert settings.ingest.batch_size == 7


def test_bad_values_are_rejected_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="batch_size"):
        load_settings({"ingest.batch_size": 0})
    with pytest.raises(ValidationError, match="log_level"):
        load_settings({"log_level": "LOUD"})
    with pytest.raises(SettingsError, match="no_such_section"):
        load_settings({"no_such_section.x": 1})


def test_unknown_keys_are_rejected_with_the_nearest_valid_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A typo used to fall back to the default without a word.
    config = tmp_path / "tuneloop.toml"
    config.write_text('[kafka]\nbootstrap_server = "broker:9092"\n')
    monkeypatch.setenv("TUNELOOP_CONFIG", str(config))
    with pytest.raises(SettingsError, match=r"'kafka.bootstrap_server' .*did you mean "
                                            r"'kafka.bootstrap_servers'"):
        load_settings()
    config.write_text('[kafka]\nbootstrap_servers = "broker:9092"\n')
    monkeypatch.delenv("TUNELOOP_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    assert load_settings().kafka.bootstrap_servers == "broker:9092"

    monkeypatch.setenv("TUNELOOP_SERVING__CANARY_SHAER", "0.5")
    with pytest.raises(SettingsError, match=r"TUNELOOP_SERVING__CANARY_SHAER.*"
                                            r"'serving.canary_share'"):
        load_settings()
    monkeypatch.delenv("TUNELOOP_SERVING__CANARY_SHAER")
    monkeypatch.setenv("TUNELOOP_CANARYY__WINDOW_S", "5")
    with pytest.raises(SettingsError, match="did you mean 'canary'"):
        load_settings()
    monkeypatch.delenv("TUNELOOP_CANARYY__WINDOW_S")
    with pytest.raises(SettingsError, match="'canary.window_s'"):
        load_settings({"canary.windw_s": 3})


def test_derived_paths_follow_home(tmp_path: Path) -> None:
    settings = load_settings({"home": tmp_path})
    assert settings.db_path == tmp_path / "tuneloop.duckdb"
    assert settings.outbox_path == tmp_path / "outbox.sqlite"



def test_min_insync_replicas_cannot_exceed_the_replication_factor() -> None:
    import pytest
    from pydantic import ValidationError

    from tuneloop.runtime.settings import KafkaSettings

    with pytest.raises(ValidationError, match="no write could succeed"):
        KafkaSettings(replication_factor=1, min_insync_replicas=2)
    assert KafkaSettings(replication_factor=3, min_insync_replicas=2).min_insync_replicas == 2


def test_the_admin_key_never_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import logging

    from tuneloop.serving.control import admin_key

    secret = "s3cret-admin-key-4711"
    monkeypatch.setenv("TUNELOOP_SERVING__ADMIN_KEY", secret)
    # From the environment, and through an override (a dump and a merge under the hood).
    for settings in (load_settings(), load_settings({"home": tmp_path})):
        shown = [str(settings), repr(settings), settings.model_dump_json(),
                 json.dumps(settings.model_dump(mode="json")), str(settings.model_dump()),
                 str(settings.serving), repr(settings.serving.admin_key),
                 logging.Formatter().format(logging.LogRecord(
                     "t", logging.INFO, __file__, 1, "settings: %s", (settings,), None))]
        assert not [text for text in shown if secret in text]
        # Read only where it is used: the gateway's auth and its clients.
        assert admin_key(settings) == secret
    monkeypatch.delenv("TUNELOOP_SERVING__ADMIN_KEY")
    assert load_settings({"serving.admin_key": secret}).serving.admin_key is not None
    generated = admin_key(load_settings({"home": tmp_path}))
    assert generated and (tmp_path / "gateway.key").read_text().strip() == generated
