"""The shared DuckDB file: who holds it, and what a waiter is told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneloop.infra.postgres import LocalPostgres
from tuneloop.runtime.settings import Settings
from tuneloop.services.store.database import AnyStore, Store, holder


def test_a_busy_store_names_its_holder_and_the_cli_exits_cleanly(tmp_path: Path) -> None:
    """No traceback: the user learns which process holds the file, and the exit is non-zero."""
    store = Store(tmp_path / "t.duckdb", lock_timeout_s=0.5)
    with store.connect():
        assert holder(store.lock_path)["pid"] == os.getpid()  # type: ignore[index]
        env = {**os.environ, "TUNELOOP_HOME": str(tmp_path), "TUNELOOP_STORE__PATH":
               str(tmp_path / "t.duckdb"), "TUNELOOP_STORE__LOCK_TIMEOUT_S": "0.5"}
        done = subprocess.run([sys.executable, "-m", "tuneloop.cli.main", "adapters", "list"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"pid {os.getpid()}" in message and "store busy" in message


_HOG = """
import sys, time
from pathlib import Path
from tuneloop.services.store.database import Store
store = Store(Path(sys.argv[1]), lock_timeout_s=60)
end = time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
while time.monotonic() < end:
    # Like a busy ingest: hold the file, let go, take it straight back.
    with store.connect() as con:
        con.execute("SELECT 1")
        time.sleep(0.3)
"""


def test_a_process_that_retakes_the_store_at_once_does_not_starve_the_others(
        tmp_path: Path) -> None:
    db = tmp_path / "t.duckdb"
    Store(db).counts()  # create the schema first
    hogs = [subprocess.Popen([sys.executable, "-c", _HOG, str(db), "20"], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).parents[2]) for _ in range(2)]
    try:
        for hog in hogs:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "ready"
        # Two processes take turns back to back for 20 s; a third waits in line and gets
        # its turn each time well within a timeout far below that.
        waiter = Store(db, lock_timeout_s=5)
        for _ in range(10):
            with waiter.connect() as con:
                assert con.execute("SELECT 1").fetchone() == (1,)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_the_broker_check_tells_kafka_from_another_program_on_the_port() -> None:
    import socket
    import threading

    from tuneloop.infra.broker import EmbeddedBroker, speaks_kafka
    from tuneloop.runtime.settings import KafkaSettings

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer_like_a_web_server() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

    threading.Thread(target=answer_like_a_web_server, daemon=True).start()
    try:
        assert not speaks_kafka("127.0.0.1", port)
        settings = Settings(kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"))
        broker = EmbeddedBroker(settings)
        assert not broker.healthy()
        with pytest.raises(OSError, match="does not speak Kafka"):
            broker.start()
    finally:
        server.close()


def test_the_postgres_url_never_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from tuneloop.runtime.settings import load_settings
    from tuneloop.services.store.postgres import where

    secret = "pa55-w0rd-4711"
    url = f"postgresql://tuneloop:{secret}@db.example:5432/tuneloop"
    monkeypatch.setenv("TUNELOOP_STORE__URL", url)
    settings = load_settings()
    shown = [str(settings), repr(settings), settings.model_dump_json(),
             json.dumps(settings.model_dump(mode="json")), str(settings.store)]
    assert not [text for text in shown if secret in text]
    assert where(url) == "postgresql://tuneloop@db.example:5432/tuneloop"
    assert where(f"host=db.example password={secret} dbname=t") == "postgres host=db.example dbname=t"
    monkeypatch.setenv("TUNELOOP_STORE__URL", f"mysql://root:{secret}@db")
    with pytest.raises(Exception, match="postgresql://") as refused:
        load_settings()
    assert secret not in str(refused.value)


def test_a_postgres_store_that_does_not_answer_names_it_without_the_password() -> None:
    import duckdb

    from tuneloop.runtime.processes import free_port
    from tuneloop.services.store.postgres import PostgresStore

    secret = "pa55-w0rd-4711"
    store = PostgresStore(f"postgresql://tuneloop:{secret}@127.0.0.1:{free_port()}/tuneloop")
    assert not store.exists()
    with pytest.raises(duckdb.Error) as failed:
        store.counts()
    assert secret not in str(failed.value) and store.where in str(failed.value)


def test_status_reads_either_store(any_store: AnyStore) -> None:
    from tuneloop.services.loop.status import read_store_figures

    any_store.counts()  # made on first use
    figures = read_store_figures(any_store)
    assert figures.exists and figures.counts["feedback"] == 0 and figures.busy is None
    assert figures.path == any_store.where


def test_a_postgres_unit_of_work_holds_the_store_and_ingest_writes_beside_it(
        postgres_server: LocalPostgres) -> None:
    """As on the DuckDB file, one unit of work at a time (a waiter is told who holds it);
    ingest's keyed writes (``exclusive=False``) go on meanwhile, from other processes too."""
    from tuneloop.services.demo import banking77
    from tuneloop.services.ingest.store import insert_events
    from tuneloop.services.store.database import StoreBusyError
    from tuneloop.services.store.postgres import PostgresStore

    url = postgres_server.new_database(f"t_{os.getpid()}_hold")
    holder_store = PostgresStore(url)
    waiter = PostgresStore(url, lock_timeout_s=0.5)
    events = list(banking77.to_events(banking77.load("test")[:3]))
    with holder_store.connect():
        with pytest.raises(StoreBusyError, match=f"tuneloop pid {os.getpid()}"), waiter.connect():
            pass
        with waiter.connect(exclusive=False) as con:
            assert insert_events(con, events) == 3
    with waiter.connect() as con:  # free again
        assert con.execute("SELECT count(*) FROM feedback").fetchone() == (3,)
