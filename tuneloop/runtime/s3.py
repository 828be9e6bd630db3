"""Reaching the S3-compatible object store (``[object_store]``): a boto3 client for this
process, and the environment that points an S3 client in another process at it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from tuneloop.runtime.settings import ObjectStoreSettings


def s3_env(cfg: ObjectStoreSettings) -> dict[str, str]:
    """The environment that points an S3 client in another process (tansu's object_store
    crate, an AWS SDK) at the store. Holds the credentials: pass it to a child process,
    never log it."""
    env = {"AWS_ENDPOINT": cfg.endpoint, "AWS_ENDPOINT_URL": cfg.endpoint,
           "AWS_REGION": cfg.region, "AWS_DEFAULT_REGION": cfg.region}
    if urlsplit(cfg.endpoint).scheme == "http":
        env["AWS_ALLOW_HTTP"] = "true"
    if cfg.access_key_id is not None and cfg.secret_access_key is not None:
        env["AWS_ACCESS_KEY_ID"] = cfg.access_key_id.get_secret_value()
        env["AWS_SECRET_ACCESS_KEY"] = cfg.secret_access_key.get_secret_value()
    elif cfg.embedded:
        # The embedded store without credentials takes unsigned requests; without this the
        # crate would look for credentials on an instance metadata service.
        env["AWS_SKIP_SIGNATURE"] = "true"
    return env


def s3_client(cfg: ObjectStoreSettings, timeout_s: float = 5.0) -> Any:
    """A boto3 S3 client for the store (path-style addressing, no retries: callers that
    wait, retry)."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    unsigned = cfg.access_key_id is None and cfg.embedded
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                    retries={"max_attempts": 1, "mode": "standard"},
                    s3={"addressing_style": "path"},
                    **({"signature_version": UNSIGNED} if unsigned else {}))
    return boto3.client(
        "s3", endpoint_url=cfg.endpoint, region_name=cfg.region, config=config,
        aws_access_key_id=cfg.access_key_id.get_secret_value() if cfg.access_key_id else None,
        aws_secret_access_key=(cfg.secret_access_key.get_secret_value()
                               if cfg.secret_access_key else None),
    )
