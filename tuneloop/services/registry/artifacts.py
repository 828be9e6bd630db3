"""Adapter artifacts on disk: the manifest, its verification, and the atomic publish.

An adapter version is a directory under ``adapters_dir``:

    v7/adapter_config.json
    v7/adapter_model.safetensors
    v7/manifest.json      sha256 of every other file, base model, dataset, hyperparameters,
                          metrics, timings

Publishing writes into a hidden temporary directory, fsyncs, and renames it into
place, so a reader (or a crash) never sees half an adapter. Every load verifies the
manifest first (:func:`verify_adapter`); only safetensors weights are accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuneloop.services.registry.core import IntegrityError

MANIFEST = "manifest.json"
WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Pickle-based weight formats run code on load: never accepted.
_UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


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


def check_source(source: Path) -> None:
    """Raise :class:`IntegrityError` unless ``source`` is a PEFT directory with safetensors."""
    if not (source / WEIGHTS).is_file() or not (source / ADAPTER_CONFIG).is_file():
        raise IntegrityError(f"{source}: expected {WEIGHTS} and {ADAPTER_CONFIG}")


def write_version(adapters_dir: Path, source: Path, version: str,
                  manifest_fields: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Copy ``source`` to ``adapters_dir/version`` with its manifest, atomically.

    The files are copied into a hidden ``.publish-*`` directory, fsynced, and renamed
    into place; returns the final directory and its manifest.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".publish-{version}-", dir=adapters_dir))
    try:
        for file in sorted(source.iterdir()):
            if file.is_file() and file.name != MANIFEST:
                shutil.copyfile(file, tmp / file.name)
        manifest = build_manifest(tmp, version=version, **manifest_fields)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _fsync_dir_files(tmp)
        os.chmod(tmp, 0o755)
        final = adapters_dir / version
        os.rename(tmp, final)
        _fsync_path(adapters_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, manifest


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
