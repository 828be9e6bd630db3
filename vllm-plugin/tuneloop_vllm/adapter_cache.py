"""A replica's own adapter cache: runtime LoRA loads of object-stored adapter versions.

The gateway asks each replica to load ``s3://<bucket>/adapters/<version>/?manifest_sha256=<hex>``.
vLLM hands that path to ``get_adapter_absolute_path`` in the process that reads the
weights; this module wraps that function: such a path becomes the directory
``$TUNELOOP_ADAPTER_CACHE/<hex>/``, fetched first when absent. The manifest must have
the sha256 the registry recorded, every file must have the sha256 its manifest lists,
and only the manifest's files are fetched (never pickle-based weights);
anything else fails the load with the reason, and nothing unverified is kept. A cached
version is verified again before every load. The cache keeps the
``TUNELOOP_ADAPTER_CACHE_KEEP`` most recently loaded versions (16 by default).

This runs in vLLM's environment, which has no tuneloop: it needs the standard library
and boto3, which reads the store's endpoint, region and credentials from the AWS_*
environment the gateway (or the replica's pod) gives it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("vllm.tuneloop_vllm")

MANIFEST = "manifest.json"
_REQUIRED = {"adapter_config.json", "adapter_model.safetensors"}
# Pickle-based weight formats run code on load: never fetched.
_UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


class AdapterCacheError(RuntimeError):
    """An object-stored adapter that cannot be loaded; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELOOP_ADAPTER_CACHE")
                or Path.home() / ".cache" / "tuneloop" / "vllm-adapters")


def is_object_stored(lora_path: str) -> bool:
    return lora_path.startswith("s3://")


def resolve(lora_path: str, client: Any = None) -> str:
    """The local, verified directory of the object-stored version ``lora_path``."""
    parts = urlsplit(lora_path)
    expected = (parse_qs(parts.query).get("manifest_sha256") or [""])[0]
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise AdapterCacheError(f"{lora_path}: no manifest_sha256=<64 hex digits>; the "
                                "gateway names every object-stored version by its checksum")
    bucket, prefix = parts.netloc, parts.path.strip("/") + "/"
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / expected
    if final.is_dir():
        try:
            _verify(final, expected)
            os.utime(final)
            return str(final)
        except (AdapterCacheError, OSError, ValueError) as exc:  # altered, or cut short
            log.warning("tuneloop adapter cache: %s; fetching it again", exc)
            shutil.rmtree(final, ignore_errors=True)
    client = client or _client()
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        client.download_file(bucket, prefix + MANIFEST, str(tmp / MANIFEST))
        files = _manifest_files(tmp, expected)
        for name in files:
            client.download_file(bucket, prefix + name, str(tmp / name))
        _verify(tmp, expected)
        try:
            os.rename(tmp, final)
        except OSError:  # another worker of this replica fetched it first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tuneloop adapter cache: %s fetched into %s and verified", lora_path, final)
    _prune(root, final)
    return str(final)


def _manifest_files(directory: Path, expected: str) -> dict[str, str]:
    """The manifest's file list, once the manifest's own sha256 is the recorded one."""
    actual = _sha256(directory / MANIFEST)
    if actual != expected:
        raise AdapterCacheError(f"manifest sha256 {actual[:12]}... is not the registry's "
                                f"{expected[:12]}...: changed after publishing, not loaded")
    files = json.loads((directory / MANIFEST).read_text()).get("files") or {}
    if not _REQUIRED.issubset(files):
        raise AdapterCacheError(f"the manifest lists {sorted(files)}, without "
                                f"{sorted(_REQUIRED - set(files))}")
    refused = sorted(n for n in files if "/" in n or n.startswith(".")
                     or Path(n).suffix in _UNSAFE_SUFFIXES)
    if refused:
        raise AdapterCacheError(f"the manifest lists {refused}: not plain file names, or "
                                "pickle-based weights (only safetensors are loaded)")
    return dict(files)


def _verify(directory: Path, expected: str) -> None:
    files = _manifest_files(directory, expected)
    present = {p.name for p in directory.iterdir()} - {MANIFEST}
    if present != set(files):
        raise AdapterCacheError(f"{directory} holds {sorted(present)}, the manifest "
                                f"{sorted(files)}")
    for name, sha in files.items():
        actual = _sha256(directory / name)
        if actual != sha:
            raise AdapterCacheError(f"{name}: sha256 {actual[:12]}... is not the manifest's "
                                    f"{sha[:12]}...: altered or corrupted, not loaded")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _prune(root: Path, keep: Path) -> None:
    limit = max(int(os.environ.get("TUNELOOP_ADAPTER_CACHE_KEEP", "16")), 1)
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and p != keep), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[limit - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _client() -> Any:
    """boto3's S3 client from the AWS_* environment (path-style addressing; unsigned when
    ``AWS_SKIP_SIGNATURE=true``, as for a local store without credentials)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    unsigned = os.environ.get("AWS_SKIP_SIGNATURE", "").lower() == "true"
    # Short timeouts: vLLM loads an adapter in its engine loop, which waits meanwhile.
    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3},
                    connect_timeout=5, read_timeout=30,
                    **({"signature_version": UNSIGNED} if unsigned else {}))
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                        config=config)


def install() -> None:
    """Route vLLM's adapter path resolution through the cache (idempotent)."""
    from vllm.lora import worker_manager

    current = worker_manager.get_adapter_absolute_path
    if getattr(current, "tuneloop_cache", False):
        return

    def get_adapter_absolute_path(lora_path: str) -> str:
        if is_object_stored(lora_path):
            try:
                return resolve(lora_path)
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - vLLM answers the load with this text
                raise AdapterCacheError(f"tuneloop adapter cache: {lora_path}: {exc}") from exc
        return current(lora_path)

    get_adapter_absolute_path.tuneloop_cache = True  # type: ignore[attr-defined]
    worker_manager.get_adapter_absolute_path = get_adapter_absolute_path
