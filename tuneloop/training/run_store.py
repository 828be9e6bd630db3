"""A training run's files in object storage (``store.artifacts``): its checkpoint, and
once it finished, its report and its trained adapter.

A run works in ``runs_dir/<run key>`` on the machine that trains it, as without object
storage; this mirrors what a run on another machine would need to go on:

- ``s3://<bucket>/runs/<run key>/checkpoint/<step>/`` after every checkpoint, then
  ``checkpoint/LATEST.json`` naming that step and the sha256 of each file. LATEST is
  written last, so it always names a whole checkpoint; older steps are deleted after it.
  A worker that starts the run with no checkpoint of its own fetches the latest,
  checks every file, and resumes from it.
- ``s3://<bucket>/runs/<run key>/`` once the run finished: the adapter (``adapter/``),
  the training curve, and ``result.json`` (the run's metrics and timings) last. A worker
  that finds it takes the finished run instead of training again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tuneloop.runtime.files import write_json_atomic
from tuneloop.runtime.s3 import s3_client
from tuneloop.runtime.settings import ObjectStoreSettings
from tuneloop.services.registry.artifacts import sha256_file
from tuneloop.training.checkpoint import replace_checkpoint

log = logging.getLogger(__name__)
LATEST = "LATEST.json"
RESULT = "result.json"
REPORTS = ("training_curve.png",)


class RunStoreError(RuntimeError):
    """A run's files in the object store are not what their record says."""


class RunStore:
    """The object-stored files of the run ``run_key``."""

    def __init__(self, cfg: ObjectStoreSettings, run_key: str, client: Any = None) -> None:
        self.bucket = cfg.bucket
        self.prefix = f"runs/{run_key}/"
        self.client = client or s3_client(cfg, timeout_s=60.0)

    # ------------------------------------------------------------ checkpoints
    def push_checkpoint(self, directory: Path, step: int) -> None:
        """Upload the checkpoint just saved in ``directory`` as step ``step``, then make it
        the latest and delete the older ones. A failure is logged, not raised: training
        goes on, the latest stored checkpoint stays the last whole one, and the next
        checkpoint tries again."""
        try:
            self._push_checkpoint(directory, step)
        except Exception as exc:  # noqa: BLE001 - the object store is down or refuses
            log.warning("checkpoint at step %d not kept in the object store: %s", step, exc)

    def _push_checkpoint(self, directory: Path, step: int) -> None:
        where = f"{self.prefix}checkpoint/{step:09d}/"
        files = {}
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            files[path.name] = sha256_file(path)
            self._put(where + path.name, path)
        record = {"step": step, "prefix": where, "files": files}
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}checkpoint/{LATEST}",
                               Body=json.dumps(record).encode())
        # Older steps only: a second trainer of the same run key (one whose heartbeats
        # stopped while it lived on) may have written a later one.
        for old in self._keys(f"{self.prefix}checkpoint/"):
            step_dir = old.removeprefix(f"{self.prefix}checkpoint/").split("/", 1)[0]
            if step_dir.isdigit() and int(step_dir) < step:
                self.client.delete_object(Bucket=self.bucket, Key=old)
        log.info("run checkpoint at step %d kept in s3://%s/%s", step, self.bucket, where)

    def pull_checkpoint(self, directory: Path) -> int | None:
        """Fetch the latest stored checkpoint into ``directory`` when it is further on than
        the one there (or there is none: another worker trained the run before); returns
        its step (None: nothing fetched). Raises :class:`RunStoreError` when a file differs
        from the record."""
        record = self._json(f"{self.prefix}checkpoint/{LATEST}")
        if record is None or int(record["step"]) <= _local_step(directory):
            return None
        where = str(record.get("prefix", ""))
        if not re.fullmatch(re.escape(f"{self.prefix}checkpoint/") + r"\d+/", where):
            raise RunStoreError(f"{self.prefix}checkpoint/{LATEST} names {where!r}, not one "
                                "of this run's checkpoints")
        for name in record["files"]:
            _plain_name(name, f"{self.prefix}checkpoint/{LATEST}")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=directory.parent))
        try:
            for name, sha in record["files"].items():
                self._get(record["prefix"] + name, tmp / name, sha)
            replace_checkpoint(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("run checkpoint at step %d fetched from s3://%s/%s", record["step"],
                 self.bucket, record["prefix"])
        return int(record["step"])

    # ------------------------------------------------------------ finished runs
    def push_result(self, run_dir: Path) -> None:
        """Upload the finished run: its adapter, its report, then ``result.json``."""
        result = json.loads((run_dir / RESULT).read_text())
        files: dict[str, str] = {}
        adapter = Path(result["adapter_dir"])
        for path in sorted(p for p in adapter.iterdir() if p.is_file()):
            files[f"adapter/{path.name}"] = sha256_file(path)
            self._put(f"{self.prefix}adapter/{path.name}", path)
        for name in REPORTS:
            if (run_dir / name).is_file():
                files[name] = sha256_file(run_dir / name)
                self._put(self.prefix + name, run_dir / name)
        body = json.dumps({**result, "files": files}).encode()
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + RESULT, Body=body)
        log.info("run finished: adapter and report kept in s3://%s/%s", self.bucket, self.prefix)

    def pull_result(self, run_dir: Path) -> bool:
        """Fetch a run another worker finished into ``run_dir`` (its adapter and report,
        checked, then ``result.json`` with this machine's paths); False when the store has
        none, or ``run_dir`` already holds a result."""
        if (run_dir / RESULT).exists():
            return False
        record = self._json(self.prefix + RESULT)
        if record is None:
            return False
        files = record.pop("files")
        for name, sha in files.items():
            if name not in REPORTS and not re.fullmatch(r"adapter/[A-Za-z0-9_.-]+", name):
                raise RunStoreError(f"{self.prefix}{RESULT} lists {name!r}, not a run's file")
            self._get(self.prefix + name, run_dir / name, sha)
        record |= {"run_dir": str(run_dir), "adapter_dir": str(run_dir / "adapter")}
        write_json_atomic(run_dir / RESULT, record)
        log.info("run %s: finished elsewhere; fetched from s3://%s/%s", run_dir.name,
                 self.bucket, self.prefix)
        return True

    # ------------------------------------------------------------ objects
    def _put(self, key: str, path: Path) -> None:
        with path.open("rb") as body:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def _get(self, key: str, path: Path, sha256: str) -> None:
        _plain_name(path.name, f"s3://{self.bucket}/{key}")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        self.client.download_file(self.bucket, key, str(partial))
        actual = sha256_file(partial)
        if actual != sha256:
            partial.unlink(missing_ok=True)
            raise RunStoreError(f"s3://{self.bucket}/{key} has sha256 {actual[:12]}..., not "
                                f"the {sha256[:12]}... recorded with it; not used")
        os.replace(partial, path)

    def _json(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return dict(json.loads(body))

    def _keys(self, prefix: str) -> list[str]:
        return [o["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix) for o in page.get("Contents", [])]



def _local_step(directory: Path) -> int:
    """The step of the checkpoint in ``directory`` (or the ``.old`` one a crash between
    two renames left); -1 when there is none."""
    for where in (directory, directory.with_name(directory.name + ".old")):
        try:
            return int(json.loads((where / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            continue
    return -1


def _plain_name(name: str, where: str) -> None:
    """Raise :class:`RunStoreError` unless ``name`` (from ``where``) is a plain file name,
    which joined to a folder stays in it."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise RunStoreError(f"{where}: {name!r} is not a file name")
