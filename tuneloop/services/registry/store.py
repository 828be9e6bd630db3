"""The registry in the store: publishing, versions by alias and state, state changes.

Every caller asks the registry (never the ``adapters`` table) which version is an
alias's production (:func:`production`) or its newest candidate (:func:`latest_candidate`),
and changes states only through :func:`promote`, :func:`reject` and :func:`rollback`,
each recorded in ``deployments`` with its reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from tuneloop.services.registry.artifacts import (
    MANIFEST,
    check_source,
    sha256_file,
    verify_adapter,
    write_version,
)
from tuneloop.services.registry.core import (
    Adapter,
    IntegrityError,
    RegistryError,
    Transition,
    check_transition,
    next_version,
    plan_promotion,
    plan_rollback,
    vllm_name,
)
from tuneloop.services.registry.remote import PREFIX, RemoteAdapters, is_remote

log = logging.getLogger(__name__)

def publish_adapter(
    con: duckdb.DuckDBPyConnection,
    adapters_dir: Path,
    source: Path,
    *,
    alias: str,
    base_model: str,
    base_hash: str,
    dataset_version: str | None,
    run_key: str | None,
    details: Mapping[str, Any],
    remote: RemoteAdapters | None = None,
) -> Adapter:
    """Publish the PEFT directory ``source`` as the next version, in state 'candidate'.

    ``details`` (hyperparameters, metrics, timings, ...) goes into the manifest. With
    ``remote`` the version goes to object storage (uploaded, read back, then recorded);
    else into ``adapters_dir``. The caller holds ``con`` for the duration, so version
    numbers never collide. Raises :class:`IntegrityError` if ``source`` holds no
    safetensors weights, or the object store did not keep the upload whole.
    """
    source = Path(source)
    check_source(source)
    root = adapters_dir
    if remote is not None:  # built beside the cache, then uploaded
        root = remote.cache_dir / ".publish"
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    repair(con, adapters_dir, remote)
    used = [r[0] for r in con.execute("SELECT version FROM adapters").fetchall()]
    broken = adapters_dir / ".broken"
    aside = [p.name for p in broken.iterdir()] if broken.is_dir() else []
    present = remote.versions() if remote is not None else [
        p.name for p in adapters_dir.iterdir()]
    version = next_version([*used, *present, *aside])
    name = vllm_name(alias, version)
    final, manifest = write_version(root, source, version, {
        "name": name, "alias": alias, "created_at": datetime.now(UTC).isoformat(),
        "base_model": {"id": base_model, "sha256": base_hash},
        "dataset_version": dataset_version, "run_key": run_key, **details})
    manifest_sha256 = sha256_file(final / MANIFEST)
    if remote is None:
        where = final.name
    else:
        try:
            where = remote.upload(final, version)
        except BaseException:
            with contextlib.suppress(Exception):  # the upload's own error is the one to see
                remote.delete(f"s3://{remote.bucket}/{PREFIX}{version}/")
            shutil.rmtree(final, ignore_errors=True)
            raise
        remote.keep(final, manifest_sha256)  # what was uploaded is this process's copy
    _register(con, where, manifest_sha256, manifest,
              f"published by training run {run_key or 'manual'}")
    log.info("adapter %s (%s) published at %s for dataset %s", version, name, where,
             dataset_version)
    adapter = get_adapter(con, version)
    return adapter


def _register(con: duckdb.DuckDBPyConnection, where: str, manifest_sha256: str,
              manifest: Mapping[str, Any], reason: str) -> None:
    """The ``adapters`` row and its ``deployments`` row of a published version (``where``:
    its directory's name under the registry root, or its s3:// URI), in one transaction:
    a crash leaves both or neither (and :func:`repair` finishes the job)."""
    base = manifest.get("base_model") or {}
    # Manifests written before the alias was recorded name the version "<alias>-<version>".
    alias = manifest.get("alias") or manifest["name"].removesuffix(f"-{manifest['version']}")
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            "INSERT INTO adapters (version, name, alias, created_at, base_model, base_hash, "
            "dataset_version, path, sha256, metrics, state, run_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [manifest["version"], manifest["name"], alias, manifest["created_at"], base.get("id"),
             base.get("sha256"), manifest.get("dataset_version"), where, manifest_sha256,
             json.dumps(dict(manifest.get("metrics") or {}), default=str), "candidate",
             manifest.get("run_key")],
        )
        _record(con, Transition(manifest["version"], "", "candidate", "publish"), reason)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def repair(con: duckdb.DuckDBPyConnection, adapters_dir: Path,
           remote: RemoteAdapters | None = None) -> list[str]:
    """Finish or undo publishes a crash cut short; returns what it did, one line each.

    A publish copies into a hidden ``.publish-*`` directory, renames it to the version,
    then writes the rows. A hidden directory is an unfinished copy: removed. A version
    directory without a row was renamed but not registered: registered from its
    manifest when the manifest verifies, else moved aside to ``.broken/``. With
    ``remote``, a version prefix in the object store without a row is registered when
    its manifest and files verify, else deleted (its run keeps the trained adapter).
    """
    done: list[str] = []
    known = {r[0] for r in con.execute("SELECT version FROM adapters").fetchall()}
    if remote is not None:
        done += _repair_remote(con, remote, known)
    if not adapters_dir.is_dir():
        return _logged(done)
    for entry in sorted(adapters_dir.iterdir()):
        if not entry.is_dir():
            continue
        if entry.name.startswith(".publish-"):
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed the unfinished copy {entry.name}")
        elif not entry.name.startswith(".") and entry.name not in known:
            try:
                manifest = verify_adapter(entry)
                if manifest.get("version") != entry.name:
                    raise IntegrityError(f"{entry}: the manifest says version "
                                         f"{manifest.get('version')!r}")
            except (IntegrityError, ValueError, KeyError) as exc:
                aside = adapters_dir / ".broken" / entry.name
                aside.parent.mkdir(exist_ok=True)
                os.rename(entry, aside)
                done.append(f"moved {entry.name} to .broken/: {exc}")
                continue
            _register(con, entry.name, sha256_file(entry / MANIFEST), manifest,
                      "registered at start-up: the publish was cut short after its "
                      "directory was in place")
            done.append(f"registered {entry.name} from its manifest")
    return _logged(done)


def _repair_remote(con: duckdb.DuckDBPyConnection, remote: RemoteAdapters,
                   known: set[str]) -> list[str]:
    done: list[str] = []
    for version in remote.versions():
        if version in known:
            continue
        uri = f"s3://{remote.bucket}/{PREFIX}{version}/"
        try:
            cached = remote.fetch(uri, None)
            manifest = json.loads((cached / MANIFEST).read_text())
            if manifest.get("version") != version:
                raise IntegrityError(f"{uri}: the manifest says version "
                                     f"{manifest.get('version')!r}")
        except (IntegrityError, FileNotFoundError, ValueError, KeyError) as exc:
            try:
                remote.delete(uri)
            except RegistryError as refused:  # kept: never recorded, so never served
                done.append(f"could not delete the unfinished upload {uri} ({exc}): {refused}")
                continue
            done.append(f"deleted the unfinished upload {uri}: {exc}")
            continue
        _register(con, uri, cached.name, manifest, "registered at start-up: the publish "
                  "was cut short after its upload was whole")
        done.append(f"registered {uri} from its manifest")
    return done


def _logged(done: list[str]) -> list[str]:
    for line in done:
        log.warning("adapter registry: %s", line)
    return done


def collect(con: duckdb.DuckDBPyConnection, remote: RemoteAdapters, keep_retired: int,
            *, dry_run: bool = False) -> list[Adapter]:
    """Delete the object-stored files of the versions no alias can go back to: every
    rejected version, and retired ones past each alias's newest ``keep_retired`` (the
    rollback targets, by when they were retired). Production, canary and candidates are
    never collected; the rows stay, so history and lineage keep their record. Returns
    the versions collected (or that would be, with ``dry_run``); a version whose objects
    the store refuses to delete is logged and left for the next collection."""
    rows = con.execute(
        f"SELECT {_COLUMNS}, (SELECT max(d.occurred_at) FROM deployments d "
        "WHERE d.adapter_version = a.version) AS moved FROM adapters a "
        "WHERE a.state IN ('retired', 'rejected') ORDER BY moved DESC").fetchall()
    kept: dict[str, int] = {}
    doomed: list[Adapter] = []
    for row in rows:
        adapter = _adapter(row[:-1])
        if not is_remote(adapter.path):
            continue
        if adapter.state == "retired" and kept.get(adapter.alias, 0) < keep_retired:
            kept[adapter.alias] = kept.get(adapter.alias, 0) + 1
            continue
        doomed.append(adapter)
    present = set(remote.versions())
    doomed = [a for a in doomed if a.version in present]
    if dry_run:
        return doomed
    collected: list[Adapter] = []
    for adapter in doomed:
        try:
            remote.delete(adapter.path)
        except RegistryError as exc:  # the next collection tries again
            log.warning("adapter %s (%s): files not collected: %s", adapter.version,
                        adapter.state, exc)
            continue
        log.info("adapter %s (%s): files collected from %s", adapter.version, adapter.state,
                 adapter.path)
        collected.append(adapter)
    return collected


def find_by_run_key(con: duckdb.DuckDBPyConnection, run_key: str) -> Adapter | None:
    """The adapter an earlier attempt of the same run already published, if any."""
    rows = con.execute("SELECT version FROM adapters WHERE run_key = ?", [run_key]).fetchall()
    return get_adapter(con, rows[0][0]) if rows else None


def get_adapter(con: duckdb.DuckDBPyConnection, version: str) -> Adapter:
    rows = con.execute(f"SELECT {_COLUMNS} FROM adapters WHERE version = ?", [version]).fetchall()
    if not rows:
        raise RegistryError(f"adapter {version!r} does not exist; see `tuneloop adapters list`")
    return _adapter(rows[0])


def list_adapters(con: duckdb.DuckDBPyConnection, alias: str | None = None) -> list[Adapter]:
    """Every adapter (of ``alias``, when given), oldest first."""
    where, params = ("WHERE alias = ?", [alias]) if alias is not None else ("", [])
    rows = con.execute(f"SELECT {_COLUMNS} FROM adapters {where} ORDER BY created_at",
                       params).fetchall()
    return [_adapter(r) for r in rows]


def production(con: duckdb.DuckDBPyConnection, alias: str) -> Adapter | None:
    """The adapter serving ``alias`` in production; None when the base model serves it."""
    return _newest(con, alias, ("production",))


def production_since(con: duckdb.DuckDBPyConnection, alias: str) -> tuple[str, datetime] | None:
    """``alias``'s production version and when it became production (its latest
    promotion); None when the base model serves the alias."""
    adapter = production(con, alias)
    if adapter is None:
        return None
    rows = con.execute("SELECT max(occurred_at) FROM deployments WHERE adapter_version = ? "
                       "AND to_state = 'production'", [adapter.version]).fetchall()
    return adapter.version, rows[0][0] or adapter.created_at


def canary(con: duckdb.DuckDBPyConnection, alias: str) -> Adapter | None:
    """The adapter of ``alias`` now in its canary, if any."""
    return _newest(con, alias, ("canary",))


def latest_candidate(con: duckdb.DuckDBPyConnection, alias: str,
                     *, in_canary: bool = False) -> Adapter | None:
    """The newest published candidate of ``alias`` (or the canary, with ``in_canary``)."""
    return _newest(con, alias, ("candidate", "canary") if in_canary else ("candidate",))


def _newest(con: duckdb.DuckDBPyConnection, alias: str, states: tuple[str, ...]) -> Adapter | None:
    marks = ", ".join("?" for _ in states)
    rows = con.execute(f"SELECT {_COLUMNS} FROM adapters WHERE alias = ? AND state IN ({marks}) "
                       "ORDER BY created_at DESC LIMIT 1", [alias, *states]).fetchall()
    return _adapter(rows[0]) if rows else None


def history(con: duckdb.DuckDBPyConnection, version: str | None = None) -> list[dict[str, Any]]:
    """Deployment rows, oldest first; of one adapter when ``version`` is given."""
    sql = ("SELECT deployment_id, occurred_at, adapter_version, from_state, to_state, action, "
           "reason FROM deployments")
    params: list[Any] = []
    if version is not None:
        sql += " WHERE adapter_version = ?"
        params.append(version)
    rows = con.execute(sql + " ORDER BY occurred_at", params).fetchall()
    keys = ("deployment_id", "occurred_at", "adapter_version", "from_state", "to_state",
            "action", "reason")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def promote(
    con: duckdb.DuckDBPyConnection, version: str, to_state: str, reason: str
) -> list[Transition]:
    """Move ``version`` to 'canary' or 'production' (retiring the old production)."""
    _need_reason(reason)
    plan = plan_promotion(_states(con, _alias_of(con, version)), version, to_state)
    return _apply(con, plan, reason)


def reject(con: duckdb.DuckDBPyConnection, version: str, reason: str) -> list[Transition]:
    """Mark ``version`` rejected (a failed canary, or a bad candidate)."""
    _need_reason(reason)
    current = _states(con, _alias_of(con, version))[version]
    check_transition(current, "rejected")
    return _apply(con, [Transition(version, current, "rejected", "reject")], reason)


def rollback(
    con: duckdb.DuckDBPyConnection, alias: str, reason: str, to_version: str | None = None
) -> list[Transition]:
    """Reject ``alias``'s production adapter and bring back the previous one (or the base model)."""
    _need_reason(reason)
    return _apply(con, rollback_plan(con, alias, to_version), reason)


def rollback_plan(con: duckdb.DuckDBPyConnection, alias: str,
                  to_version: str | None = None) -> list[Transition]:
    """What :func:`rollback` would do, without doing it."""
    retired = [r[0] for r in con.execute(
        "SELECT a.version FROM adapters a JOIN deployments d ON d.adapter_version = a.version "
        "WHERE a.alias = ? AND a.state = 'retired' AND d.to_state = 'retired' "
        "GROUP BY a.version ORDER BY max(d.occurred_at) DESC", [alias]
    ).fetchall()]
    return plan_rollback(_states(con, alias), retired, to_version)


def _apply(con: duckdb.DuckDBPyConnection, plan: list[Transition], reason: str) -> list[Transition]:
    _need_reason(reason)
    con.execute("BEGIN TRANSACTION")
    try:
        for step in plan:
            con.execute("UPDATE adapters SET state = ? WHERE version = ?",
                        [step.to_state, step.version])
            _record(con, step, reason)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    for step in plan:
        log.info("adapter %s: %s -> %s (%s): %s", step.version, step.from_state, step.to_state,
                 step.action, reason)
    return plan


def _need_reason(reason: str) -> None:
    if not reason.strip():
        raise RegistryError("every state change needs a reason; pass --reason")


def _record(con: duckdb.DuckDBPyConnection, step: Transition, reason: str) -> None:
    con.execute(
        "INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?, ?)",
        [str(uuid.uuid4()), datetime.now(UTC), step.version, step.from_state or None,
         step.to_state, step.action, reason],
    )


def _states(con: duckdb.DuckDBPyConnection, alias: str) -> dict[str, str]:
    """Every version of ``alias`` and its state: promotions and rollbacks act within an alias."""
    return {v: s for v, s in con.execute("SELECT version, state FROM adapters WHERE alias = ?",
                                         [alias]).fetchall()}


def _alias_of(con: duckdb.DuckDBPyConnection, version: str) -> str:
    return get_adapter(con, version).alias


_COLUMNS = ("version, name, alias, created_at, base_model, base_hash, dataset_version, path, "
            "sha256, metrics, state, run_key")


def _adapter(row: tuple[Any, ...]) -> Adapter:
    (version, name, alias, created, base, base_hash, dataset, path, sha, metrics, state,
     run_key) = row
    return Adapter(version, name, alias, created, base, base_hash, dataset, path, sha,
                   json.loads(metrics) if isinstance(metrics, str) else dict(metrics or {}),
                   state, run_key)


