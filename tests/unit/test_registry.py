"""Registry rules: manifests, atomic publishing, state transitions (real DuckDB file)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tuneloop.services.registry import artifacts
from tuneloop.services.registry import store as registry
from tuneloop.services.registry.artifacts import verify_adapter
from tuneloop.services.registry.core import (
    Adapter,
    IntegrityError,
    InvalidTransitionError,
    RegistryError,
    Transition,
    check_transition,
    next_version,
    plan_promotion,
    plan_rollback,
)
from tuneloop.services.store.database import AnyStore, Store


def _peft_dir(root: Path, weights: bytes = b"weights") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (root / "adapter_model.safetensors").write_bytes(weights)
    return root


def _publish(con, adapters: Path, source: Path, key: str | None = None,
             alias: str = "support-bot") -> Adapter:
    return registry.publish_adapter(
        con, adapters, source, alias=alias, base_model="base", base_hash="abc",
        dataset_version="ds1", run_key=key, details={"metrics": {"golden": {"accuracy": 0.5}}},
    )


@pytest.mark.parametrize(
    ("src", "dst", "ok"),
    [
        ("candidate", "canary", True), ("candidate", "production", True),
        ("candidate", "rejected", True), ("candidate", "retired", False),
        ("canary", "production", True), ("canary", "rejected", True),
        ("canary", "candidate", False), ("production", "retired", True),
        ("production", "rejected", True), ("production", "canary", False),
        ("retired", "production", True), ("retired", "canary", False),
        ("rejected", "production", False), ("rejected", "candidate", False),
    ],
)
def test_transition_rules(src: str, dst: str, ok: bool) -> None:
    if ok:
        check_transition(src, dst)
    else:
        with pytest.raises(InvalidTransitionError, match=f"from {src!r} to {dst!r}"):
            check_transition(src, dst)


def test_unknown_state_is_refused() -> None:
    with pytest.raises(InvalidTransitionError, match="does not exist"):
        check_transition("candidate", "live")


def test_promotion_retires_the_old_production() -> None:
    states = {"v1": "production", "v2": "canary"}
    assert plan_promotion(states, "v2", "production") == [
        Transition("v1", "production", "retired", "retire"),
        Transition("v2", "canary", "production", "promote"),
    ]
    with pytest.raises(RegistryError, match="already the canary"):
        plan_promotion({"v1": "canary", "v2": "candidate"}, "v2", "canary")
    with pytest.raises(RegistryError, match="does not exist"):
        plan_promotion(states, "v9", "production")
    with pytest.raises(InvalidTransitionError):
        plan_promotion({"v1": "rejected"}, "v1", "production")


def test_rollback_restores_the_last_retired_or_the_base() -> None:
    states = {"v1": "retired", "v2": "retired", "v3": "production"}
    assert plan_rollback(states, ["v2", "v1"]) == [
        Transition("v3", "production", "rejected", "rollback"),
        Transition("v2", "retired", "production", "rollback"),
    ]
    assert plan_rollback(states, ["v2", "v1"], "v1")[1].version == "v1"
    assert plan_rollback({"v1": "production"}, []) == [
        Transition("v1", "production", "rejected", "rollback")
    ]
    with pytest.raises(RegistryError, match="nothing to roll back"):
        plan_rollback({"v1": "candidate"}, [])
    with pytest.raises(RegistryError, match="not 'retired'"):
        plan_rollback(states, [], "v3")


def test_versions_are_never_reused() -> None:
    assert next_version([]) == "v1"
    assert next_version(["v1", "v10", "v3", ".publish-v11-x", "junk"]) == "v11"


def test_manifest_verifies_and_tampering_is_refused(tmp_path: Path, any_store: AnyStore) -> None:
    store = any_store
    source = _peft_dir(tmp_path / "run" / "adapter")
    with store.connect() as con:
        adapter = _publish(con, tmp_path / "adapters", source)
    assert adapter.path == adapter.version  # relative to the registry root: the home can move
    path = adapter.directory(tmp_path / "adapters")
    manifest = verify_adapter(path, adapter.sha256)
    weights = source / "adapter_model.safetensors"
    assert manifest["files"]["adapter_model.safetensors"] == registry.sha256_file(weights)
    assert manifest["base_model"] == {"id": "base", "sha256": "abc"}
    assert manifest["dataset_version"] == "ds1"

    (path / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        verify_adapter(path)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    verify_adapter(path)

    (path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(IntegrityError, match="pickle-based"):
        verify_adapter(path)
    (path / "adapter_model.bin").unlink()

    (path / "notes.txt").write_text("x")
    with pytest.raises(IntegrityError, match="not in the manifest"):
        verify_adapter(path)
    (path / "notes.txt").unlink()

    manifest_path = path / "manifest.json"
    edited = json.loads(manifest_path.read_text())
    edited["files"]["adapter_config.json"] = "0" * 64
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(IntegrityError, match="differs from the registry"):
        verify_adapter(path, adapter.sha256)


def test_crash_mid_publish_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
, any_store: AnyStore) -> None:
    store = any_store
    adapters = tmp_path / "adapters"
    source = _peft_dir(tmp_path / "src")

    def crash(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "rename", crash)
    with store.connect() as con, pytest.raises(OSError, match="disk full"):
        _publish(con, adapters, source)
    monkeypatch.undo()
    assert list(adapters.iterdir()) == []  # the temporary directory is gone too
    with store.connect() as con:
        assert registry.list_adapters(con) == []
        adapter = _publish(con, adapters, source)
    assert adapter.version == "v1" and adapter.state == "candidate"


def test_a_crash_after_the_rename_is_finished_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
, any_store: AnyStore) -> None:
    """Directory in place, rows not written (the process died between): the next start
    registers it from its manifest; leftovers of a copy are removed, a damaged directory
    is moved aside; and a crash between the two rows leaves neither."""
    store = any_store
    adapters = tmp_path / "adapters"
    source = _peft_dir(tmp_path / "src")

    def die(*args: object, **kwargs: object) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(registry, "_record", die)
    with store.connect() as con, pytest.raises(SystemExit):
        _publish(con, adapters, source, key="run-1")
    monkeypatch.undo()
    with store.connect() as con:
        assert registry.list_adapters(con) == []  # the adapters row was rolled back too
        assert con.execute("SELECT count(*) FROM deployments").fetchall()[0][0] == 0
    assert (adapters / "v1").is_dir()
    (adapters / ".publish-v2-x").mkdir()
    with store.connect() as con:
        done = registry.repair(con, adapters)
        adapter = registry.find_by_run_key(con, "run-1")
        moves = registry.history(con, "v1")
    assert sorted(done) == ["registered v1 from its manifest",
                            "removed the unfinished copy .publish-v2-x"]
    damaged = _peft_dir(tmp_path / "src2", b"other")
    with store.connect() as con:
        _publish(con, adapters, damaged)  # v2
        con.execute("DELETE FROM deployments WHERE adapter_version = 'v2'")
        con.execute("DELETE FROM adapters WHERE version = 'v2'")
    (adapters / "v2" / "adapter_model.safetensors").write_bytes(b"tampered")
    with store.connect() as con:
        done = registry.repair(con, adapters)
    assert len(done) == 1 and done[0].startswith("moved v2 to .broken/")
    assert adapter is not None and adapter.version == "v1" and adapter.state == "candidate"
    assert adapter.metrics == {"golden": {"accuracy": 0.5}} and len(moves) == 1
    assert sorted(p.name for p in adapters.iterdir()) == [".broken", "v1"]
    with store.connect() as con:
        assert _publish(con, adapters, source).version == "v3"  # v2's number stays used


def test_lifecycle_records_every_move(tmp_path: Path, any_store: AnyStore) -> None:
    store = any_store
    adapters = tmp_path / "adapters"
    with store.connect() as con:
        v1 = _publish(con, adapters, _peft_dir(tmp_path / "a"), key="run-a")
        v2 = _publish(con, adapters, _peft_dir(tmp_path / "b", b"other"), key="run-b")
        assert (v1.version, v2.version, v2.name) == ("v1", "v2", "support-bot-v2")
        assert registry.find_by_run_key(con, "run-b") == v2
        assert registry.find_by_run_key(con, "run-c") is None
        registry.promote(con, "v1", "production", "first adapter")
        registry.promote(con, "v2", "canary", "canary check")
        registry.promote(con, "v2", "production", "canary passed")
        states = {a.version: a.state for a in registry.list_adapters(con)}
        assert states == {"v1": "retired", "v2": "production"}
        registry.rollback(con, "support-bot", "error rate up")
        states = {a.version: a.state for a in registry.list_adapters(con)}
        assert states == {"v1": "production", "v2": "rejected"}
        with pytest.raises(RegistryError, match="needs a reason"):
            registry.promote(con, "v1", "canary", " ")
        with pytest.raises(InvalidTransitionError):
            registry.promote(con, "v2", "production", "again")
        moves = [(m["adapter_version"], m["from_state"], m["to_state"], m["action"])
                 for m in registry.history(con)]
    assert moves == [
        ("v1", None, "candidate", "publish"), ("v2", None, "candidate", "publish"),
        ("v1", "candidate", "production", "promote"), ("v2", "candidate", "canary", "promote"),
        ("v1", "production", "retired", "retire"), ("v2", "canary", "production", "promote"),
        ("v2", "production", "rejected", "rollback"), ("v1", "retired", "production", "rollback"),
    ]
    # A removed row does not free its version number: the directory still holds it.
    assert sorted(os.listdir(adapters)) == ["v1", "v2"]


def test_each_alias_has_its_own_production_and_candidates(tmp_path: Path, any_store: AnyStore) -> None:
    """Versions are numbered across aliases, but promoting one alias's adapter never
    retires another's, and each alias answers for its own production and candidates."""
    store = any_store
    adapters = tmp_path / "adapters"
    with store.connect() as con:
        a1 = _publish(con, adapters, _peft_dir(tmp_path / "a"), alias="support-bot")
        b2 = _publish(con, adapters, _peft_dir(tmp_path / "b", b"b"), alias="billing-bot")
        a3 = _publish(con, adapters, _peft_dir(tmp_path / "c", b"c"), alias="support-bot")
        assert (a1.version, b2.version, a3.version) == ("v1", "v2", "v3")
        assert (b2.alias, b2.name) == ("billing-bot", "billing-bot-v2")
        assert registry.production(con, "support-bot") is None
        assert registry.latest_candidate(con, "support-bot") == a3
        registry.promote(con, "v1", "production", "first")
        registry.promote(con, "v2", "production", "first of billing")
        assert registry.production(con, "support-bot").version == "v1"  # type: ignore[union-attr]
        assert registry.production(con, "billing-bot").version == "v2"  # type: ignore[union-attr]
        registry.promote(con, "v3", "canary", "try it")
        assert registry.latest_candidate(con, "support-bot") is None
        assert registry.latest_candidate(con, "support-bot", in_canary=True).version == "v3"  # type: ignore[union-attr]
        assert registry.canary(con, "billing-bot") is None
        registry.rollback(con, "billing-bot", "worse")
        assert registry.production(con, "billing-bot") is None
        assert registry.production(con, "support-bot").version == "v1"  # type: ignore[union-attr]
        assert [a.version for a in registry.list_adapters(con, "billing-bot")] == ["v2"]


def test_a_file_from_before_the_alias_column_is_migrated(tmp_path: Path) -> None:
    """An adapters table with ``flow_run_id`` and no ``alias`` (older tuneloop) opens with
    the column renamed to ``run_key`` and each alias taken from the vLLM name."""
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE adapters (version VARCHAR PRIMARY KEY, name VARCHAR NOT NULL UNIQUE, "
                "created_at TIMESTAMPTZ NOT NULL, base_model VARCHAR NOT NULL, "
                "base_hash VARCHAR NOT NULL, dataset_version VARCHAR, path VARCHAR NOT NULL, "
                "sha256 VARCHAR NOT NULL, metrics JSON NOT NULL, state VARCHAR NOT NULL, "
                "flow_run_id VARCHAR)")
    con.execute("INSERT INTO adapters VALUES ('v4', 'my-bot-2-v4', now(), 'base', 'abc', NULL, "
                "'/x', 'f00', '{}', 'production', 'run-9')")
    con.close()
    with Store(path).connect() as con:
        adapter = registry.find_by_run_key(con, "run-9")
        assert adapter is not None and adapter.alias == "my-bot-2"
        assert registry.production(con, "my-bot-2") == adapter


def test_a_moved_home_keeps_its_registry(tmp_path: Path) -> None:
    """Paths are kept relative to the registry root, so a home moved (or mounted elsewhere)
    still finds and verifies every version; absolute paths of older files are migrated."""
    import shutil

    home = tmp_path / "home"
    store = Store(home / "t.duckdb")
    with store.connect() as con:
        adapter = _publish(con, home / "adapters", _peft_dir(tmp_path / "run" / "adapter"))
        # A row as older versions wrote it: the absolute path of the version's directory.
        con.execute("UPDATE adapters SET path = ? WHERE version = ?",
                    [str(home / "adapters" / adapter.version) + "/", adapter.version])
    moved = tmp_path / "elsewhere"
    shutil.move(home, moved)
    with Store(moved / "t.duckdb").connect() as con:  # a new process: migrations run
        again = registry.get_adapter(con, adapter.version)
    assert again.path == adapter.version
    verify_adapter(again.directory(moved / "adapters"), again.sha256)


def test_deleting_a_version_whose_objects_the_store_keeps_is_an_error(tmp_path: Path) -> None:
    """DeleteObjects answers 200 and lists the keys it refused in its body: the refusal is
    raised (collection must not report a version collected whose files are still there).
    The client is botocore's own, its answers stubbed: the shapes are S3's."""
    from botocore.stub import Stubber

    from tuneloop.runtime.s3 import s3_client
    from tuneloop.runtime.settings import ObjectStoreSettings
    from tuneloop.services.registry.remote import RemoteAdapters

    cfg = ObjectStoreSettings(endpoint="http://127.0.0.1:9", bucket="models")
    client = s3_client(cfg)
    remote = RemoteAdapters(cfg, tmp_path / "cache", client)
    keys = ["adapters/v3/MANIFEST.json", "adapters/v3/adapter_model.safetensors"]
    with Stubber(client) as stub:
        for refused in ([], [{"Key": keys[1], "Code": "AccessDenied", "Message": "Access Denied"}]):
            stub.add_response("list_objects_v2", {"Contents": [{"Key": k} for k in keys]},
                              {"Bucket": "models", "Prefix": "adapters/v3/"})
            stub.add_response("delete_objects", {"Errors": refused}, {
                "Bucket": "models", "Delete": {"Objects": [{"Key": k} for k in keys], "Quiet": True}})
        assert remote.delete("s3://models/adapters/v3/") == 2
        with pytest.raises(RegistryError, match=r"kept 1 of 2 objects .*safetensors "
                                                r"\(AccessDenied"):
            remote.delete("s3://models/adapters/v3/")
        stub.assert_no_pending_responses()
