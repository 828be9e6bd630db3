"""The adapter registry: atomic publishing, manifest verification, deployment states.

An adapter version (``v1``, ``v2``, ...; vLLM name ``<alias>-v<N>``, never reused)
is a directory under ``adapters_dir``:

    v7/adapter_config.json
    v7/adapter_model.safetensors
    v7/manifest.json      sha256 of every other file, base model, dataset, hyperparameters,
                          metrics, timings

Publishing writes into a hidden temporary directory, fsyncs, and renames it into
place, so a reader (or a crash) never sees half an adapter. Every load verifies the
manifest first (:func:`verify_adapter`); only safetensors weights are accepted.

States and the moves between them (every move is a row in ``deployments``):

    candidate -> canary -> production -> retired -> production (rollback / re-promote)
        \\-> production   \\-> rejected    \\-> rejected (rollback)
         \\-> rejected
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATES = ("candidate", "canary", "production", "retired", "rejected")
ALLOWED: dict[str, frozenset[str]] = {
    "candidate": frozenset({"canary", "production", "rejected"}),
    "canary": frozenset({"production", "rejected"}),
    "production": frozenset({"retired", "rejected"}),
    "retired": frozenset({"production"}),
    "rejected": frozenset(),
}
# Pickle-based weight formats run code on load: never accepted.
_UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_VERSION = re.compile(r"^v(\d+)$")


class RegistryError(ValueError):
    """A registry request that cannot be honoured; the message says why and what to do."""


class IntegrityError(RegistryError):
    """An adapter's files do not match its manifest (or are not safetensors)."""


class InvalidTransitionError(RegistryError):
    """A state change the lifecycle does not allow."""


@dataclass(frozen=True)
class Adapter:
    """One row of ``adapters``."""

    version: str
    name: str
    created_at: datetime
    base_model: str
    base_hash: str
    dataset_version: str | None
    path: str
    sha256: str  # of manifest.json, which covers every other file
    metrics: dict[str, Any]
    state: str
    run_key: str | None


@dataclass(frozen=True)
class Transition:
    """One planned state change of one adapter."""

    version: str
    from_state: str
    to_state: str
    action: str


# ------------------------------------------------------------------ pure core
def check_transition(from_state: str, to_state: str) -> None:
    """Raise :class:`InvalidTransitionError` unless ``from_state -> to_state`` is allowed."""
    if to_state not in STATES:
        raise InvalidTransitionError(f"state {to_state!r} does not exist; use one of {STATES}")
    if to_state not in ALLOWED.get(from_state, frozenset()):
        allowed = sorted(ALLOWED.get(from_state, frozenset())) or "none (final state)"
        raise InvalidTransitionError(
            f"cannot move an adapter from {from_state!r} to {to_state!r}; from {from_state!r} "
            f"it may go to: {allowed}"
        )


def plan_promotion(states: Mapping[str, str], version: str, to_state: str) -> list[Transition]:
    """The transitions that put ``version`` into ``to_state`` ('canary' or 'production').

    ``states`` maps every adapter version to its state. Promoting to production
    retires the current production adapter; only one canary may run at a time.
    """
    if version not in states:
        raise RegistryError(f"adapter {version!r} does not exist; see `tuneloop adapters list`")
    if to_state not in {"canary", "production"}:
        raise RegistryError(f"promote to {to_state!r}: use 'canary' or 'production'")
    current = states[version]
    if current == to_state:
        raise RegistryError(f"adapter {version} is already in {to_state}")
    check_transition(current, to_state)
    plan: list[Transition] = []
    holders = [v for v, s in states.items() if s == to_state]
    if to_state == "canary" and holders:
        raise RegistryError(
            f"adapter {holders[0]} is already the canary; promote or reject it first"
        )
    for holder in holders:
        plan.append(Transition(holder, "production", "retired", "retire"))
    plan.append(Transition(version, current, to_state, "promote"))
    return plan


def plan_rollback(
    states: Mapping[str, str], retired_order: Iterable[str], to_version: str | None = None
) -> list[Transition]:
    """Reject the production adapter and restore ``to_version`` (default: the last retired).

    ``retired_order`` lists retired versions, most recently retired first. With no
    retired adapter, the alias falls back to the base model.
    """
    production = [v for v, s in states.items() if s == "production"]
    if not production:
        raise RegistryError("no adapter is in production; nothing to roll back")
    plan = [Transition(production[0], "production", "rejected", "rollback")]
    target = to_version or next(iter(retired_order), None)
    if target is not None:
        if states.get(target) != "retired":
            raise RegistryError(
                f"cannot roll back to {target!r}: it is {states.get(target, 'unknown')!r}, "
                "not 'retired'"
            )
        plan.append(Transition(target, "retired", "production", "rollback"))
    return plan


def next_version(existing: Iterable[str]) -> str:
    """The first version number above every one ever used (``v1`` for none)."""
    numbers = [int(m.group(1)) for v in existing if (m := _VERSION.match(v))]
    return f"v{max(numbers, default=0) + 1}"


def vllm_name(alias: str, version: str) -> str:
    """The adapter's name in vLLM and the gateway, e.g. ``support-bot-v7``."""
    return f"{alias}-{version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(directory: Path, **fields: Any) -> dict[str, Any]:
    """A manifest covering every file in ``directory`` (except a previous manifest)."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    return {"format": 1, "files": files, **fields}


def verify_adapter(directory: Path, manifest_sha256: str | None = None) -> dict[str, Any]:
    """Check an adapter directory against its manifest; return the manifest.

    Raises :class:`IntegrityError` when the manifest is missing or altered, a file
    is missing, extra, or differs from its recorded sha256, or the weights are not
    safetensors. Nothing in the directory should be loaded after a failure.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise IntegrityError(f"{directory}: no {MANIFEST}; republish the adapter")
    if manifest_sha256 is not None and sha256_file(manifest_path) != manifest_sha256:
        raise IntegrityError(
            f"{manifest_path} differs from the registry's record (sha256 {manifest_sha256[:12]}); "
            "the manifest was edited after publishing, do not load this adapter"
        )
    manifest = json.loads(manifest_path.read_text())
    files: dict[str, str] = manifest.get("files", {})
    if WEIGHTS not in files or ADAPTER_CONFIG not in files:
        raise IntegrityError(f"{directory}: manifest must list {WEIGHTS} and {ADAPTER_CONFIG}")
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST}
    unsafe = sorted(n for n in present if Path(n).suffix in _UNSAFE_SUFFIXES)
    if unsafe:
        raise IntegrityError(f"{directory}: refusing pickle-based files {unsafe}; "
                             "only safetensors weights are loaded")
    extra = sorted(present - set(files))
    if extra:
        raise IntegrityError(f"{directory}: files not in the manifest: {extra}")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{directory}: {name} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest's "
                f"{expected[:12]}...; the file was modified or corrupted, do not load it"
            )
    return manifest


# ------------------------------------------------------------------ I/O shell
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
) -> Adapter:
    """Publish the PEFT directory ``source`` as the next version, in state 'candidate'.

    ``details`` (hyperparameters, metrics, timings, ...) goes into the manifest.
    The caller holds ``con`` for the duration, so version numbers never collide.
    Raises :class:`IntegrityError` if ``source`` holds no safetensors weights.
    """
    source = Path(source)
    if not (source / WEIGHTS).is_file() or not (source / ADAPTER_CONFIG).is_file():
        raise IntegrityError(f"{source}: expected {WEIGHTS} and {ADAPTER_CONFIG}")
    adapters_dir.mkdir(parents=True, exist_ok=True)
    repair(con, adapters_dir)
    used = [r[0] for r in con.execute("SELECT version FROM adapters").fetchall()]
    broken = adapters_dir / ".broken"
    aside = [p.name for p in broken.iterdir()] if broken.is_dir() else []
    version = next_version([*used, *(p.name for p in adapters_dir.iterdir()), *aside])
    name = vllm_name(alias, version)
    created = datetime.now(UTC)
    tmp = Path(tempfile.mkdtemp(prefix=f".publish-{version}-", dir=adapters_dir))
    try:
        for file in sorted(source.iterdir()):
            if file.is_file() and file.name != MANIFEST:
                shutil.copyfile(file, tmp / file.name)
        manifest = build_manifest(
            tmp, version=version, name=name, created_at=created.isoformat(),
            base_model={"id": base_model, "sha256": base_hash},
            dataset_version=dataset_version, run_key=run_key, **details,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _fsync_dir_files(tmp)
        os.chmod(tmp, 0o755)
        final = adapters_dir / version
        os.rename(tmp, final)
        _fsync_path(adapters_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _register(con, final, manifest, f"published by training run {run_key or 'manual'}")
    log.info("adapter %s (%s) published at %s for dataset %s", version, name, final,
             dataset_version)
    adapter = get_adapter(con, version)
    return adapter


def _register(con: duckdb.DuckDBPyConnection, directory: Path, manifest: Mapping[str, Any],
              reason: str) -> None:
    """The ``adapters`` row and its ``deployments`` row of a published directory, in one
    transaction: a crash leaves both or neither (and :func:`repair` finishes the job)."""
    base = manifest.get("base_model") or {}
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            "INSERT INTO adapters (version, name, created_at, base_model, base_hash, "
            "dataset_version, path, sha256, metrics, state, flow_run_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [manifest["version"], manifest["name"], manifest["created_at"], base.get("id"),
             base.get("sha256"), manifest.get("dataset_version"), str(directory.resolve()),
             sha256_file(directory / MANIFEST),
             json.dumps(dict(manifest.get("metrics") or {}), default=str), "candidate",
             manifest.get("run_key")],
        )
        _record(con, Transition(manifest["version"], "", "candidate", "publish"), reason)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def repair(con: duckdb.DuckDBPyConnection, adapters_dir: Path) -> list[str]:
    """Finish or undo publishes a crash cut short; returns what it did, one line each.

    A publish copies into a hidden ``.publish-*`` directory, renames it to the version,
    then writes the rows. A hidden directory is an unfinished copy: removed. A version
    directory without a row was renamed but not registered: registered from its
    manifest when the manifest verifies, else moved aside to ``.broken/``.
    """
    if not adapters_dir.is_dir():
        return []
    done: list[str] = []
    known = {r[0] for r in con.execute("SELECT version FROM adapters").fetchall()}
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
            _register(con, entry, manifest, "registered at start-up: the publish was cut "
                      "short after its directory was in place")
            done.append(f"registered {entry.name} from its manifest")
    for line in done:
        log.warning("adapter registry: %s", line)
    return done


def find_by_run_key(con: duckdb.DuckDBPyConnection, run_key: str) -> Adapter | None:
    """The adapter an earlier attempt of the same run already published, if any."""
    rows = con.execute("SELECT version FROM adapters WHERE flow_run_id = ?", [run_key]).fetchall()
    return get_adapter(con, rows[0][0]) if rows else None


def get_adapter(con: duckdb.DuckDBPyConnection, version: str) -> Adapter:
    rows = con.execute(f"SELECT {_COLUMNS} FROM adapters WHERE version = ?", [version]).fetchall()
    if not rows:
        raise RegistryError(f"adapter {version!r} does not exist; see `tuneloop adapters list`")
    return _adapter(rows[0])


def list_adapters(con: duckdb.DuckDBPyConnection) -> list[Adapter]:
    rows = con.execute(f"SELECT {_COLUMNS} FROM adapters ORDER BY created_at").fetchall()
    return [_adapter(r) for r in rows]


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
    plan = plan_promotion(_states(con), version, to_state)
    return _apply(con, plan, reason)


def reject(con: duckdb.DuckDBPyConnection, version: str, reason: str) -> list[Transition]:
    """Mark ``version`` rejected (a failed canary, or a bad candidate)."""
    _need_reason(reason)
    current = _states(con).get(version)
    if current is None:
        raise RegistryError(f"adapter {version!r} does not exist; see `tuneloop adapters list`")
    check_transition(current, "rejected")
    return _apply(con, [Transition(version, current, "rejected", "reject")], reason)


def rollback(
    con: duckdb.DuckDBPyConnection, reason: str, to_version: str | None = None
) -> list[Transition]:
    """Reject the production adapter and bring back the previous one (or the base model)."""
    _need_reason(reason)
    return _apply(con, rollback_plan(con, to_version), reason)


def rollback_plan(con: duckdb.DuckDBPyConnection, to_version: str | None = None) -> list[Transition]:
    """What :func:`rollback` would do, without doing it."""
    retired = [r[0] for r in con.execute(
        "SELECT a.version FROM adapters a JOIN deployments d ON d.adapter_version = a.version "
        "WHERE a.state = 'retired' AND d.to_state = 'retired' "
        "GROUP BY a.version ORDER BY max(d.occurred_at) DESC"
    ).fetchall()]
    return plan_rollback(_states(con), retired, to_version)


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


def _states(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    return {v: s for v, s in con.execute("SELECT version, state FROM adapters").fetchall()}


_COLUMNS = ("version, name, created_at, base_model, base_hash, dataset_version, path, sha256, "
            "metrics, state, flow_run_id")


def _adapter(row: tuple[Any, ...]) -> Adapter:
    (version, name, created, base, base_hash, dataset, path, sha, metrics, state, run_key) = row
    return Adapter(version, name, created, base, base_hash, dataset, path, sha,
                   json.loads(metrics) if isinstance(metrics, str) else dict(metrics or {}),
                   state, run_key)


def _fsync_dir_files(directory: Path) -> None:
    for file in directory.iterdir():
        with file.open("rb") as fh:
            os.fsync(fh.fileno())
    _fsync_path(directory)


def _fsync_path(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
