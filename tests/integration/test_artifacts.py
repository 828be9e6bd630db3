"""Adapters in object storage (store.artifacts) on the real object store (SeaweedFS): the
publish (upload, read back, record), the checksum cache of each process and of each vLLM
replica (tuneloop's vLLM plugin, run here with the same boto3), repair of a publish cut
short, the collection policy, and training checkpoints kept in the store."""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lora_files import write_lora
from tuneloop.infra.object_store import EmbeddedObjectStore
from tuneloop.runtime.processes import free_port
from tuneloop.runtime.s3 import s3_client
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.registry.artifacts import write_version
from tuneloop.services.registry.core import IntegrityError
from tuneloop.services.registry.remote import RemoteAdapters, files_of, lora_uri, split_uri
from tuneloop.services.registry.store import (
    collect,
    get_adapter,
    list_adapters,
    promote,
    publish_adapter,
    reject,
    repair,
)
from tuneloop.services.store.database import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vllm-plugin"))

from tuneloop_vllm import adapter_cache  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    home = tmp_path_factory.mktemp("artifacts")
    settings = load_settings({"home": home, "store.artifacts": True,
                              "object_store.endpoint": f"http://127.0.0.1:{free_port()}"})
    store = EmbeddedObjectStore(settings)
    store.start()
    yield settings
    store.process.stop(sig=signal.SIGKILL)


@pytest.fixture
def bucket(objects: Settings, tmp_path: Path) -> Settings:
    """A bucket of the test's own, so versions and collections of one test never meet
    another's."""
    name = f"t-{tmp_path.name[-20:].lower().replace('_', '-')}".strip("-")[:40]
    settings = load_settings({"home": tmp_path / "home", "store.artifacts": True,
                              "object_store.endpoint": objects.object_store.endpoint,
                              "object_store.bucket": name})
    s3_client(settings.object_store).create_bucket(Bucket=name)
    return settings


def _publish(settings: Settings, con: object, tiny_base_path: str, seed: int,
             remote: RemoteAdapters | None = None) -> str:
    source = Path(settings.home) / f"lora-{seed}"
    write_lora(tiny_base_path, source, rank=4, seed=seed)
    adapter = publish_adapter(
        con, settings.adapters_dir, source, alias="bot", base_model="tiny", base_hash="t",  # type: ignore[arg-type]
        dataset_version=None, run_key=None, details={"metrics": {}},
        remote=remote or RemoteAdapters.of(settings))
    return adapter.version


def test_a_version_is_uploaded_whole_then_recorded_and_every_cache_verifies_it(
        bucket: Settings, tiny_base: object, tmp_path: Path) -> None:
    base_path = tiny_base.path  # type: ignore[attr-defined]
    with Store(bucket.db_path).connect() as con:
        version = _publish(bucket, con, base_path, seed=1)
        adapter = get_adapter(con, version)
    name = bucket.object_store.bucket
    assert adapter.path == f"s3://{name}/adapters/{version}/"
    assert not Path(bucket.adapters_dir, version).exists()  # nothing under the home
    client = s3_client(bucket.object_store)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=name)["Contents"]}
    assert f"adapters/{version}/manifest.json" in keys
    manifest = client.get_object(Bucket=name, Key=f"adapters/{version}/manifest.json")
    assert hashlib.sha256(manifest["Body"].read()).hexdigest() == adapter.sha256

    # Another machine's process: a cache of its own, filled by checksum and verified.
    elsewhere = RemoteAdapters(bucket.object_store, tmp_path / "other-machine")
    files = files_of(adapter, bucket.adapters_dir, elsewhere)
    assert files == tmp_path / "other-machine" / adapter.sha256
    assert json.loads((files / "manifest.json").read_text())["version"] == version
    # A cached copy altered on disk is fetched again, not used.
    (files / "adapter_model.safetensors").write_bytes(b"altered")
    assert files_of(adapter, bucket.adapters_dir, elsewhere) == files
    assert (files / "adapter_model.safetensors").read_bytes() != b"altered"

    # The replica's loader (the vLLM plugin) with the URI the gateway sends.
    replica_cache = tmp_path / "replica-0"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELOOP_ADAPTER_CACHE", str(replica_cache))
        loaded = adapter_cache.resolve(lora_uri(adapter), client=client)
        assert loaded == str(replica_cache / adapter.sha256)
        for bad in ("/" * 64, "../" * 21 + "x"):  # a path, not a checksum: never used as one
            with pytest.raises(adapter_cache.AdapterCacheError, match="64 hex"):
                adapter_cache.resolve(f"{adapter.path}?manifest_sha256={bad}", client=client)
        with pytest.raises(adapter_cache.AdapterCacheError, match="not the registry's"):
            adapter_cache.resolve(f"{adapter.path}?manifest_sha256={'0' * 64}", client=client)
        # The weights object replaced after publishing: a fresh cache refuses it.
        key = split_uri(adapter.path)[1] + "adapter_model.safetensors"
        client.put_object(Bucket=name, Key=key, Body=b"not the published weights")
        mp.setenv("TUNELOOP_ADAPTER_CACHE", str(tmp_path / "replica-1"))
        with pytest.raises(adapter_cache.AdapterCacheError, match="sha256"):
            adapter_cache.resolve(lora_uri(adapter), client=client)
        assert not (tmp_path / "replica-1" / adapter.sha256).exists()
    with pytest.raises(IntegrityError, match="sha256"):
        files_of(adapter, bucket.adapters_dir, RemoteAdapters(bucket.object_store,
                                                              tmp_path / "third"))


def test_repair_registers_a_whole_upload_and_deletes_a_broken_one(
        bucket: Settings, tiny_base: object) -> None:
    """A publish cut short after its upload (no row) is registered from its manifest; one
    cut short mid-upload (no manifest) is deleted, and its number (never recorded, never
    served) is free again."""
    remote = RemoteAdapters.of(bucket)
    source = Path(bucket.home) / "lora"
    write_lora(tiny_base.path, source, rank=4, seed=3)  # type: ignore[attr-defined]
    built = Path(bucket.home) / "built"
    built.mkdir(parents=True)
    for version in ("v1", "v2"):
        final, _ = write_version(built, source, version, {
            "name": f"bot-{version}", "alias": "bot", "created_at": "2026-12-01T00:00:00+00:00",
            "base_model": {"id": "tiny", "sha256": "t"}, "dataset_version": None})
        remote.upload(final, version)
    client = s3_client(bucket.object_store)
    client.delete_object(Bucket=bucket.object_store.bucket, Key="adapters/v2/manifest.json")
    with Store(bucket.db_path).connect() as con:
        done = repair(con, bucket.adapters_dir, remote)
        assert any("registered s3://" in line and "/v1/" in line for line in done), done
        assert any("deleted the unfinished upload" in line and "/v2/" in line
                   for line in done), done
        assert [a.version for a in list_adapters(con)] == ["v1"]
        assert remote.versions() == ["v1"]
        assert _publish(bucket, con, tiny_base.path, seed=4, remote=remote) == "v2"  # type: ignore[attr-defined]


def test_collection_keeps_what_an_alias_can_go_back_to(
        bucket: Settings, tiny_base: object) -> None:
    """Production, canary, candidates and the newest keep_retired retired versions keep
    their files; older retired and every rejected version lose theirs; every row stays."""
    remote = RemoteAdapters.of(bucket)
    with Store(bucket.db_path).connect() as con:
        versions = [_publish(bucket, con, tiny_base.path, seed=10 + i, remote=remote)  # type: ignore[attr-defined]
                    for i in range(7)]
        v1, v2, v3, v4, v5, v6, v7 = versions
        for v in (v1, v2, v3, v4, v5):  # each retires the one before
            promote(con, v, "production", "next")
        reject(con, v6, "worse")
        assert sorted(a.version for a in collect(con, remote, keep_retired=2,
                                                 dry_run=True)) == [v1, v2, v6]
        assert remote.versions() == sorted(versions)  # a dry run deletes nothing
        gone = collect(con, remote, keep_retired=2)
        assert sorted(a.version for a in gone) == [v1, v2, v6]
        assert sorted(remote.versions()) == sorted([v3, v4, v5, v7])
        assert len(list_adapters(con)) == 7
        assert collect(con, remote, keep_retired=2) == []  # nothing left to collect


def test_a_checkpoint_record_naming_a_path_outside_the_run_is_refused(
        bucket: Settings, tmp_path: Path) -> None:
    from tuneloop.training.run_store import LATEST, RunStore, RunStoreError

    runs = RunStore(bucket.object_store, "run-a")
    checkpoint = tmp_path / "trained" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    runs.push_checkpoint(checkpoint, 3)
    # Another worker fetches it whole.
    fetched = tmp_path / "elsewhere" / "checkpoint"
    assert runs.pull_checkpoint(fetched) == 3
    assert (fetched / "adapter_model.safetensors").read_bytes() == b"weights"
    # A later step is written: the older one is deleted, the later one kept.
    runs.push_checkpoint(checkpoint, 5)
    keys = {o["Key"] for o in runs.client.list_objects_v2(
        Bucket=runs.bucket, Prefix="runs/run-a/checkpoint/")["Contents"]}
    assert keys == {"runs/run-a/checkpoint/LATEST.json",
                    "runs/run-a/checkpoint/000000005/adapter_model.safetensors"}

    # Whoever can write the bucket cannot make a worker write outside its checkpoint.
    target = tmp_path / "outside.txt"
    sha = hashlib.sha256(b"evil").hexdigest()
    runs.client.put_object(Bucket=runs.bucket, Key="runs/run-a/checkpoint/000000009/x",
                           Body=b"evil")
    for record in ({"step": 9, "prefix": "runs/run-a/checkpoint/000000009/",
                    "files": {"../../../outside.txt": sha}},
                   {"step": 9, "prefix": "runs/other/checkpoint/000000009/",
                    "files": {"x": sha}}):
        runs.client.put_object(Bucket=runs.bucket, Key=f"runs/run-a/checkpoint/{LATEST}",
                               Body=json.dumps(record).encode())
        with pytest.raises(RunStoreError):
            runs.pull_checkpoint(tmp_path / "third" / "checkpoint")
    assert not target.exists() and not (tmp_path / "third" / "checkpoint").exists()
