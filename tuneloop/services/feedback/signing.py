"""What the gateway vouches for: keyed signatures on the verdicts it accepted.

Anyone who reaches Kafka can write a feedback event claiming any version, rating and
source. The gateway signs each event it makes (a verdict on an answer it served, or a
served answer) with a key it shares with the canary (``serving.event_key``, else
``<home>/event.key``); the canary's live window counts only verdicts whose signature
holds, so ratings from anywhere else never steer a promotion. The signature covers the
fields a verdict is counted by, none of the free text that ingest redacts.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE = "gateway_signature"  # the metadata key


def event_signature(key: bytes, event_id: str, request_id: str, adapter_version: str | None,
                    rating: float | None, user_id: str | None, extra: str = "") -> str:
    """The signature of a gateway-made event over the fields it is counted by (``extra``:
    what else a kind of verdict is counted by, such as the side a preference chose)."""
    parts = ["event", event_id, request_id, adapter_version or "",
             "" if rating is None else repr(float(rating)), user_id or ""]
    fields = "|".join([*parts, extra] if extra else parts)
    return hmac.new(key, fields.encode(), hashlib.sha256).hexdigest()


def signed_by_gateway(key: bytes, signature: str | None, event_id: str, request_id: str,
                      adapter_version: str | None, rating: float | None,
                      user_id: str | None, extra: str = "") -> bool:
    """Whether ``signature`` is the gateway's on these fields."""
    if not signature:
        return False
    expected = event_signature(key, event_id, request_id, adapter_version, rating, user_id,
                               extra)
    return hmac.compare_digest(expected, signature)


def preference_extra(chosen_version: str | None, rejected_version: str | None) -> str:
    """What a side-by-side verdict's signature covers besides a verdict's usual fields:
    which version it chose over which."""
    return f"preferred:{chosen_version or 'base'}>{rejected_version or 'base'}"


def feedback_token(key: bytes, response_id: str, user: str | None) -> str:
    """The token that lets the user who received ``response_id`` post a verdict on it."""
    return hmac.new(key, f"token|{response_id}|{user or ''}".encode(),
                    hashlib.sha256).hexdigest()[:32]
