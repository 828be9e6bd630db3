"""Dataset versions as Parquet snapshots on the real object store (SeaweedFS), written
and read by DuckDB, on both stores: written once, read back with their content hash
checked, and refused when altered."""

from __future__ import annotations

import io
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.unit.test_curation import cand
from tuneloop.infra.object_store import EmbeddedObjectStore, s3_client
from tuneloop.infra.postgres import LocalPostgres
from tuneloop.runtime.processes import free_port
from tuneloop.runtime.settings import Settings, load_settings
from tuneloop.services.curation.core import select
from tuneloop.services.curation.datasets import (
    DatasetExists,
    content_hash,
    load_examples,
    load_preferences,
    save_version,
)
from tuneloop.services.curation.preferences import PreferencePair
from tuneloop.services.store.database import AnyStore, Store
from tuneloop.services.store.postgres import PostgresStore
from tuneloop.services.store.snapshots import SnapshotError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    home = tmp_path_factory.mktemp("snapshots")
    settings = load_settings({"home": home, "store.snapshots": True,
                              "object_store.endpoint": f"http://127.0.0.1:{free_port()}"})
    store = EmbeddedObjectStore(settings)
    store.start()
    yield settings
    store.process.stop(sig=signal.SIGKILL)


@pytest.fixture(params=["duckdb", "postgres"])
def snapshot_store(request: pytest.FixtureRequest, object_store: Settings,
                   tmp_path: Path) -> AnyStore:
    if request.param == "duckdb":
        return Store(tmp_path / "t.duckdb", snapshots=object_store.object_store)
    server: LocalPostgres = request.getfixturevalue("postgres_server")
    return PostgresStore(server.new_database(f"t_{uuid.uuid4().hex[:12]}"),
                         snapshots=object_store.object_store)


def test_a_version_is_written_once_read_back_and_refused_when_altered(
        object_store: Settings, snapshot_store: AnyStore) -> None:
    examples = [e for i in range(6) if not isinstance(e := select(cand(i)), str)]
    pairs = [PreferencePair("p1", "e1", [{"role": "user", "content": "q"}], "good", "bad",
                            "correction", "train")]
    version = f"ds-{uuid.uuid4().hex[:8]}"  # one bucket for both stores
    with snapshot_store.connect() as con:
        digest = save_version(con, version, examples, [], {}, {}, pairs)
        (where,) = con.execute("SELECT snapshot FROM datasets WHERE version = ?",
                               [version]).fetchone()
        assert where.startswith(f"s3://{object_store.object_store.bucket}/datasets/{version}-")
        # Read from the snapshot, the same content as curated.
        loaded, loaded_pairs = load_examples(con, version), load_preferences(con, version)
        assert content_hash(loaded, loaded_pairs) == digest
        assert sorted(e.example_id for e in loaded) == sorted(e.example_id for e in examples)
        assert [p.pair_id for p in loaded_pairs] == ["p1"]
        with pytest.raises(DatasetExists):
            save_version(con, version, examples[:2], [], {}, {})

    client = s3_client(object_store.object_store)
    key = where.split("/", 3)[3] + "examples.parquet"
    body = client.get_object(Bucket=object_store.object_store.bucket, Key=key)["Body"].read()
    table = pq.read_table(io.BytesIO(body))
    altered = table.set_column(table.schema.get_field_index("completion"), "completion",
                               pa.array(["poisoned"] * table.num_rows))
    out = io.BytesIO()
    pq.write_table(altered, out)
    client.put_object(Bucket=object_store.object_store.bucket, Key=key, Body=out.getvalue())
    with snapshot_store.connect() as con, pytest.raises(SnapshotError, match="altered"):
        load_examples(con, version)
