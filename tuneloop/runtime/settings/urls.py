"""Checks on what a setting points at: S3 bucket names, hosts of this machine, and the
embedded broker's storage URL. Each returns why a value is wrong, or None."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

# S3's rules for a bucket a path-style client can reach: 3-63 characters, lower-case
# letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def bucket_problem(name: str) -> str | None:
    """Why ``name`` is not a usable S3 bucket name, or None when it is."""
    if not _BUCKET.match(name):
        return ("a bucket name is 3-63 characters of lower-case letters, digits, dots and "
                "hyphens, starting and ending with a letter or digit")
    if ".." in name:
        return "a bucket name has no two dots in a row"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return None
    return "a bucket name is not an IP address"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def storage_bucket(engine: str) -> str | None:
    """The bucket of an ``s3://BUCKET/`` storage engine; None for ``memory``.

    Raises ``ValueError`` naming the fix for anything else.
    """
    if engine == "memory":
        return None
    hint = ("use 'memory' (lost when the broker stops) or 's3://BUCKET/' (tansu's S3 "
            "engine, on the store in [object_store])")
    parts = urlsplit(engine)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"kafka.storage_engine={engine!r}: {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"kafka.storage_engine={engine!r}: tansu keeps its log at the "
                         f"root of the bucket (under clusters/); give 's3://{parts.netloc}/'")
    problem = bucket_problem(parts.netloc)
    if problem:
        raise ValueError(f"kafka.storage_engine={engine!r}: {problem}")
    return parts.netloc
