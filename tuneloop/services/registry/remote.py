"""Adapter versions in object storage (``store.artifacts``), and the checksum cache that
every process reads them through.

A version lives at ``s3://<bucket>/adapters/<version>/``: its files and ``manifest.json``
(the manifest of :mod:`~tuneloop.services.registry.artifacts`, the sha256 of every other
file). Publishing builds the version in a local directory, uploads every file with the
manifest last, reads each object back and checks its sha256, and only then is the row
recorded (with the URI as its ``path`` and the manifest's sha256): a reader never meets
a version that is not whole, and a publish cut short leaves a prefix no row names, which
:func:`~tuneloop.services.registry.store.repair` registers (if it verifies) or deletes.

A process that needs a version's files (a training worker continuing from production,
the offline gate, ``tuneloop adapters verify``) fetches them by the manifest's sha256
into its own cache, ``<home>/cache/adapters/<sha256>/``, and verifies them there before
use; a cached copy is verified again on every use. vLLM replicas do the same in their
own cache through tuneloop's vLLM plugin (``vllm-plugin/tuneloop_vllm/adapter_cache.py``),
given the URI :func:`lora_uri` builds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuneloop.runtime.s3 import s3_client
from tuneloop.runtime.settings import ObjectStoreSettings, Settings
from tuneloop.services.registry.artifacts import MANIFEST, sha256_file, verify_adapter
from tuneloop.services.registry.core import Adapter, IntegrityError, RegistryError

log = logging.getLogger(__name__)
PREFIX = "adapters/"
CACHE_KEEP = 16  # versions a process's cache keeps; the least recently used go first


def is_remote(path: str) -> bool:
    """Whether an ``adapters.path`` names object storage rather than the registry directory."""
    return path.startswith("s3://")


def lora_uri(adapter: Adapter) -> str:
    """What a vLLM replica is asked to load: the version's prefix and the sha256 its
    manifest must have (tuneloop's vLLM plugin fetches, checks and caches it)."""
    return f"{adapter.path}?manifest_sha256={adapter.sha256}"


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/adapters/v7/`` -> ``("bucket", "adapters/v7/")``."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise RegistryError(f"{uri!r} is not an s3:// URI")
    return parts.netloc, parts.path.lstrip("/").rstrip("/") + "/"


class RemoteAdapters:
    """The adapter versions under ``s3://<bucket>/adapters/``, and this process's cache."""

    def __init__(self, cfg: ObjectStoreSettings, cache_dir: Path, client: Any = None) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.cache_dir = Path(cache_dir)
        self._client = client

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use (a registry on disk never needs one)."""
        if self._client is None:
            self._client = s3_client(self.cfg, timeout_s=60.0)
        return self._client

    @classmethod
    def of(cls, settings: Settings) -> RemoteAdapters:
        return cls(settings.object_store, adapter_cache_dir(settings))

    # ----------------------------------------------------------------- publish
    def upload(self, directory: Path, version: str) -> str:
        """Upload the version built in ``directory`` (manifest last), read every object back
        and check it; returns the version's URI. Raises :class:`IntegrityError` when an
        object read back differs (nothing is recorded then)."""
        prefix = f"{PREFIX}{version}/"
        manifest = json.loads((directory / MANIFEST).read_text())
        expected = {**manifest["files"], MANIFEST: sha256_file(directory / MANIFEST)}
        for name in [*sorted(manifest["files"]), MANIFEST]:
            with (directory / name).open("rb") as body:
                self.client.put_object(Bucket=self.bucket, Key=prefix + name, Body=body)
        for name, sha in expected.items():
            got = self._sha256(prefix + name)
            if got != sha:
                raise IntegrityError(f"s3://{self.bucket}/{prefix}{name} reads back with sha256 "
                                     f"{got[:12]}..., not the {sha[:12]}... uploaded; the "
                                     "object store did not keep it, the version is not recorded")
        uri = f"s3://{self.bucket}/{prefix}"
        log.info("adapter %s uploaded to %s and read back whole", version, uri)
        return uri

    def keep(self, directory: Path, manifest_sha256: str) -> None:
        """Move a version this process built and uploaded into its cache."""
        final = self.cache_dir / manifest_sha256
        if final.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
        else:
            os.rename(directory, final)

    def versions(self) -> list[str]:
        """The versions with objects under ``adapters/`` (recorded or not), sorted. Listed
        by object, not by common prefix: some stores (SeaweedFS) keep an emptied prefix."""
        found: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=PREFIX):
            found.update(o["Key"][len(PREFIX):].split("/", 1)[0] for o in page.get("Contents", [])
                         if "/" in o["Key"][len(PREFIX):])
        return sorted(found)

    def delete(self, uri: str) -> int:
        """Delete every object under the version's prefix; returns how many.

        Raises :class:`RegistryError` naming the keys the store refused to delete (a
        ``DeleteObjects`` call answers 200 and lists per-key errors in its body)."""
        bucket, prefix = split_uri(uri)
        keys = [o["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
        refused: list[str] = []
        for start in range(0, len(keys), 1000):
            answer = self.client.delete_objects(Bucket=bucket, Delete={
                "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
            refused += [f"{e.get('Key')} ({e.get('Code')}: {e.get('Message')})"
                        for e in answer.get("Errors", [])]
        if refused:
            raise RegistryError(f"the object store kept {len(refused)} of {len(keys)} objects "
                                f"under {uri}: {'; '.join(refused[:5])}")
        return len(keys)

    # ----------------------------------------------------------------- read
    def fetch(self, uri: str, manifest_sha256: str | None) -> Path:
        """The version at ``uri`` in this process's cache, verified; fetched first when the
        cache lacks it. ``manifest_sha256`` None (a prefix no row names yet, in repair)
        takes the manifest as found and checks the files against it.

        Raises :class:`IntegrityError` when the manifest is not the recorded one or a file
        differs from its manifest, ``FileNotFoundError`` when the version's objects are gone
        (collected, or never uploaded).
        """
        bucket, prefix = split_uri(uri)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if manifest_sha256 is not None:
            cached = self.cache_dir / manifest_sha256
            if cached.is_dir():
                try:
                    verify_adapter(cached, manifest_sha256)
                    os.utime(cached)  # most recently used
                    return cached
                except IntegrityError as exc:
                    log.warning("adapter cache: %s; fetching it again", exc)
                    shutil.rmtree(cached, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.cache_dir))
        try:
            manifest_path = tmp / MANIFEST
            self._get(bucket, prefix + MANIFEST, manifest_path)
            sha = sha256_file(manifest_path)
            if manifest_sha256 is not None and sha != manifest_sha256:
                raise IntegrityError(f"{uri}{MANIFEST} has sha256 {sha[:12]}..., not the "
                                     f"registry's {manifest_sha256[:12]}...; it was replaced "
                                     "after publishing, do not load this adapter")
            for name in json.loads(manifest_path.read_text()).get("files", {}):
                if "/" in name or name in (".", "..", MANIFEST):
                    raise IntegrityError(f"{uri}{MANIFEST} lists {name!r}, not a file name")
                self._get(bucket, prefix + name, tmp / name)
            verify_adapter(tmp, sha)
            final = self.cache_dir / sha
            try:
                os.rename(tmp, final)
            except OSError:  # another thread of this process fetched it first
                if not final.is_dir():
                    raise
            log.info("adapter %s fetched into %s and verified", uri, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        prune_cache(self.cache_dir, CACHE_KEEP, keep=final)
        return final

    def _get(self, bucket: str, key: str, path: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.download_file(bucket, key, str(path))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"s3://{bucket}/{key} does not exist: the version's "
                                        "files were collected or never uploaded") from None
            raise RegistryError(f"the object store refused s3://{bucket}/{key}: {exc}") from None
        except BotoCoreError as exc:
            raise RegistryError(f"the object store at {self.cfg.endpoint} cannot be reached "
                                f"for s3://{bucket}/{key}: {exc}") from None

    def _sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        for chunk in iter(lambda: body.read(1 << 20), b""):
            digest.update(chunk)
        return digest.hexdigest()


def adapter_cache_dir(settings: Settings) -> Path:
    """This process's adapter cache: ``<home>/cache/adapters``."""
    return Path(settings.home) / "cache" / "adapters"


def prune_cache(cache_dir: Path, keep_count: int, keep: Path | None = None) -> list[str]:
    """Delete all but the ``keep_count`` most recently used versions in ``cache_dir``
    (never ``keep``); returns the names deleted."""
    entries = sorted((p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and p != keep), key=lambda p: p.stat().st_mtime, reverse=True)
    gone = entries[max(keep_count - (1 if keep is not None else 0), 0):]
    for entry in gone:
        shutil.rmtree(entry, ignore_errors=True)
    return [p.name for p in gone]


def files_of(adapter: Adapter, adapters_dir: Path, remote: RemoteAdapters) -> Path:
    """A directory holding ``adapter``'s files, verified against its recorded manifest:
    its directory under ``adapters_dir``, or (object-stored) ``remote``'s cached copy.

    Raises :class:`IntegrityError` when they do not verify, ``FileNotFoundError`` when an
    object-stored version's files are gone.
    """
    if not is_remote(adapter.path):
        directory = adapter.directory(adapters_dir)
        verify_adapter(directory, adapter.sha256)
        return directory
    return remote.fetch(adapter.path, adapter.sha256)


def local_files(adapter: Adapter, settings: Settings) -> Path:
    """:func:`files_of` with this process's settings."""
    return files_of(adapter, settings.adapters_dir, RemoteAdapters.of(settings))
