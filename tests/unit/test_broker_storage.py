"""Where the broker keeps its log: kafka.storage_engine, the [object_store] section and
their checks at load, the environment and command that reach the store, and the topic
configs passed at creation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tuneloop.infra.broker import EmbeddedBroker
from tuneloop.infra.object_store import (
    EmbeddedObjectStore,
    buckets_in_use,
    s3_env,
    uses_object_store,
)
from tuneloop.runtime.processes import free_port
from tuneloop.runtime.settings import KafkaSettings, ObjectStoreSettings, Settings, load_settings
from tuneloop.services.feedback.topics import new_topics

SECRET = "s3cret-never-shown-4f1c"
CREDENTIALS = {"object_store.access_key_id": "tuneloop",
               "object_store.secret_access_key": SECRET}


def test_the_default_keeps_the_embedded_brokers_log_in_the_object_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing the embedded broker acknowledged is lost when it stops: by default its log
    is in the object store's bucket, which `tuneloop up` runs. An external cluster keeps
    its own; memory is one setting away. (The test session's own broker runs on memory,
    tests/conftest.py, so the variable is cleared here.)"""
    monkeypatch.delenv("TUNELOOP_KAFKA__STORAGE_ENGINE", raising=False)
    settings = load_settings({"home": tmp_path})
    assert settings.kafka.storage_engine == "s3://tuneloop/"
    assert settings.kafka.storage_bucket == "tuneloop" and uses_object_store(settings)
    assert (settings.kafka.replication_factor, settings.kafka.min_insync_replicas) == (1, 1)
    assert settings.object_store_dir == tmp_path / "object-store"
    other = load_settings({"home": tmp_path, "object_store.bucket": "feedback-log"})
    assert other.kafka.storage_engine == "s3://feedback-log/"
    external = load_settings({"home": tmp_path, "kafka.embedded": False})
    assert external.kafka.storage_engine == "memory" and not uses_object_store(external)
    memory = load_settings({"home": tmp_path, "kafka.storage_engine": "memory"})
    assert memory.kafka.storage_bucket is None and not uses_object_store(memory)


def test_an_s3_engine_names_its_bucket(tmp_path: Path) -> None:
    settings = load_settings({"home": tmp_path, "kafka.storage_engine": "s3://broker-log/"})
    assert settings.kafka.storage_bucket == "broker-log"
    assert uses_object_store(settings)
    assert buckets_in_use(settings) == ["broker-log", "tuneloop"]
    shared = load_settings({"kafka.storage_engine": "s3://tuneloop"})
    assert buckets_in_use(shared) == ["tuneloop"]


@pytest.mark.parametrize(("engine", "fix"), [
    ("sqlite://tansu/", "use 'memory'"),
    ("memory://tansu/", "use 'memory'"),
    ("s3://", "use 'memory'"),
    ("s3://Broker_Log/", "lower-case letters"),
    ("s3://ab/", "3-63 characters"),
    ("s3://192.168.1.1/", "not an IP address"),
    ("s3://tuneloop/kafka/", "give 's3://tuneloop/'"),
])
def test_a_bad_storage_engine_is_named_with_the_fix(engine: str, fix: str) -> None:
    with pytest.raises(ValidationError, match="kafka.storage_engine") as caught:
        load_settings({"kafka.storage_engine": engine})
    assert fix in str(caught.value)


def test_the_storage_engine_is_the_embedded_brokers_only() -> None:
    with pytest.raises(ValidationError, match="remove kafka.storage_engine"):
        KafkaSettings(embedded=False, storage_engine="s3://tuneloop/")
    assert KafkaSettings(embedded=False).storage_bucket is None


@pytest.mark.parametrize(("endpoint", "fix"), [
    ("https://127.0.0.1:18333", "plain http"),
    ("http://10.0.0.5:18333", "this machine"),
    ("http://127.0.0.1", "http://127.0.0.1:PORT"),
])
def test_the_embedded_store_listens_on_this_machine(endpoint: str, fix: str) -> None:
    with pytest.raises(ValidationError, match="object_store.endpoint") as caught:
        load_settings({"object_store.endpoint": endpoint})
    assert fix in str(caught.value)
    external = load_settings({"object_store.endpoint": endpoint, "object_store.embedded": False})
    assert external.object_store.endpoint == endpoint


@pytest.mark.parametrize(("endpoint", "fix"), [
    ("127.0.0.1:18333", "scheme://host[:port]"),
    ("http://127.0.0.1:0", "port"),
    ("http://127.0.0.1:70000", "port"),
    ("http://127.0.0.1:18333/tuneloop", "alone"),
])
def test_a_malformed_endpoint_is_named_with_the_fix(endpoint: str, fix: str) -> None:
    with pytest.raises(ValidationError, match="object_store.endpoint") as caught:
        load_settings({"object_store.endpoint": endpoint})
    assert fix in str(caught.value)


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("object_store.bucket", "Tuneloop", "e.g. 'tuneloop'"),
    ("object_store.region", "US East", "'us-east-1'"),
])
def test_bad_bucket_and_region_are_named(key: str, value: str, fix: str) -> None:
    with pytest.raises(ValidationError, match=key.replace(".", r"\.")) as caught:
        load_settings({key: value})
    assert fix in str(caught.value)


def test_any_bad_value_beside_credentials_is_an_error_that_names_it() -> None:
    """A type pydantic raises itself (a path that is not one) is reported like the others,
    without the section's credentials."""
    with pytest.raises(ValidationError, match=r"object_store\.data_dir") as caught:
        load_settings({"object_store.access_key_id": "tuneloop",
                       "object_store.secret_access_key": SECRET, "object_store.data_dir": 5})
    assert "path" in str(caught.value) and SECRET not in str(caught.value)


def test_credentials_go_together_and_are_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    for half in ({"object_store.access_key_id": SECRET},
                 {"object_store.secret_access_key": SECRET},
                 {"object_store.access_key_id": "", "object_store.secret_access_key": SECRET}):
        with pytest.raises(ValidationError, match="set both or neither|give both") as caught:
            load_settings(half)
        assert SECRET not in str(caught.value)
    with pytest.raises(ValidationError, match="holds credentials") as caught:
        load_settings({"object_store.endpoint": f"http://u:{SECRET}@127.0.0.1:18333"})
    assert SECRET not in str(caught.value)

    monkeypatch.setenv("TUNELOOP_OBJECT_STORE__ACCESS_KEY_ID", "tuneloop")
    monkeypatch.setenv("TUNELOOP_OBJECT_STORE__SECRET_ACCESS_KEY", SECRET)
    settings = load_settings({"kafka.storage_engine": "s3://tuneloop/"})
    store = settings.object_store
    assert store.secret_access_key is not None
    assert store.secret_access_key.get_secret_value() == SECRET
    for shown in (repr(settings), str(settings), settings.model_dump_json(), repr(store)):
        assert SECRET not in shown


def test_the_store_environment_carries_what_tansu_needs() -> None:
    local = load_settings(CREDENTIALS).object_store
    env = s3_env(local)
    assert env["AWS_ENDPOINT"] == "http://127.0.0.1:18333"
    assert env["AWS_ALLOW_HTTP"] == "true"
    assert env["AWS_REGION"] == "us-east-1"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("tuneloop", SECRET)
    assert "AWS_SKIP_SIGNATURE" not in env
    # Without credentials the embedded store takes unsigned requests.
    assert s3_env(ObjectStoreSettings())["AWS_SKIP_SIGNATURE"] == "true"
    # An external store without them: the usual AWS sources, over https.
    external = s3_env(ObjectStoreSettings(endpoint="https://s3.eu-west-1.amazonaws.com",
                                          embedded=False, region="eu-west-1"))
    assert not {"AWS_ALLOW_HTTP", "AWS_SKIP_SIGNATURE", "AWS_ACCESS_KEY_ID"} & set(external)
    assert external["AWS_REGION"] == "eu-west-1"


def test_the_embedded_store_names_every_port_it_opens(tmp_path: Path) -> None:
    port = free_port()
    settings = load_settings({"home": tmp_path, "object_store.endpoint": f"http://127.0.0.1:{port}"})
    argv = EmbeddedObjectStore(settings)._argv()
    flags = dict(a.lstrip("-").split("=", 1) for a in argv[2:])
    assert argv[1] == "mini"
    assert flags["s3.port"] == str(port)
    assert Path(flags["dir"]) == (tmp_path / "object-store").resolve()
    for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                 "admin.port.grpc"):
        assert flags[name].isdigit() and flags[name] != str(port), name
    assert flags["s3.port.iceberg"] == flags["s3.port.lance"] == "0"
    # No credentials: empty ones, so any in tuneloop's own environment do not lock it.
    assert EmbeddedObjectStore(settings)._env() == {"AWS_ACCESS_KEY_ID": "",
                                                    "AWS_SECRET_ACCESS_KEY": ""}


def test_the_broker_refuses_to_start_on_s3_storage_no_store_answers(tmp_path: Path) -> None:
    settings = load_settings({"home": tmp_path, "kafka.storage_engine": "s3://tuneloop/",
                              "kafka.bootstrap_servers": f"127.0.0.1:{free_port()}",
                              "object_store.endpoint": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(OSError, match="no S3 store answers at object_store.endpoint"):
        EmbeddedBroker(settings).start()
    assert EmbeddedBroker(settings).process.pid() is None


def test_topics_are_created_with_the_replication_the_settings_ask_for() -> None:
    embedded = new_topics(KafkaSettings(), ["feedback.v1", "feedback.v1.dlq"])
    assert [(t.name, t.num_partitions, t.replication_factor, t.topic_configs)
            for t in embedded] == [("feedback.v1", 3, 1, {}), ("feedback.v1.dlq", 3, 1, {})]
    production = KafkaSettings(embedded=False, replication_factor=3, min_insync_replicas=2,
                               partitions=6)
    topics = new_topics(production, ["feedback.v1", "tuneloop.shadow.v1"])
    assert [(t.name, t.num_partitions, t.replication_factor) for t in topics] == [
        ("feedback.v1", 6, 3), ("tuneloop.shadow.v1", 6, 3)]
    assert all(t.topic_configs == {"min.insync.replicas": "2"} for t in topics)


def test_production_replication_is_documented_in_the_settings() -> None:
    fields = KafkaSettings.model_fields
    assert "production: 3" in (fields["replication_factor"].description or "")
    assert "production: 2" in (fields["min_insync_replicas"].description or "")


def test_secrets_survive_an_override_of_their_section(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings merges overrides onto a dump of what the file and environment gave."""
    monkeypatch.setenv("TUNELOOP_OBJECT_STORE__ACCESS_KEY_ID", "tuneloop")
    monkeypatch.setenv("TUNELOOP_OBJECT_STORE__SECRET_ACCESS_KEY", SECRET)
    settings = load_settings({"object_store.region": "eu-west-1"})
    assert settings.object_store.region == "eu-west-1"
    assert settings.object_store.secret_access_key is not None
    assert settings.object_store.secret_access_key.get_secret_value() == SECRET
    assert Settings(**settings.model_dump()).object_store == settings.object_store
