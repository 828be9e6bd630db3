"""Talking to one vLLM replica over HTTP (aiohttp): health, adapters, probes.

vLLM's runtime LoRA routes answer 200 only once the weights were read and
validated; a name already loaded gives 400, a missing path 404, and a rank above
``--max-lora-rank`` or corrupt weights 500 (older versions used 400), after which
the server stays healthy. Callers branch on :attr:`UpstreamError.client_error`
(4xx: the request or the adapter is at fault) versus 5xx (the engine refused), not
on exact codes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

_CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=2)
_HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=3, sock_connect=1)


class UpstreamError(Exception):
    """A replica answered with an error, or could not be reached (``status`` 0)."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"{url}: {status or 'unreachable'}: {message}")
        self.url = url
        self.status = status
        self.message = message

    @property
    def client_error(self) -> bool:
        return 400 <= self.status < 500

    @property
    def retriable(self) -> bool:
        """Unreachable or overloaded: another try (or replica) may succeed."""
        return self.status == 0 or self.status in (502, 503, 504)


def error_message(body: bytes) -> str:
    """The message of an OpenAI-format error body, else the body itself (shortened)."""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict) and "message" in err:
                return str(err["message"])
            if isinstance(err, str):
                return err
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:300].decode(errors="replace")


@dataclass
class ReplicaClient:
    """Control-plane calls to one replica; the data plane streams in the gateway."""

    url: str
    session: aiohttp.ClientSession

    async def healthy(self) -> bool:
        try:
            async with self.session.get(f"{self.url}/health", timeout=_HEALTH_TIMEOUT) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def models(self) -> dict[str, str | None]:
        """Served names -> the path they were loaded from (``root``)."""
        data = await self._call("GET", "/v1/models", timeout=_HEALTH_TIMEOUT)
        return {m["id"]: m.get("root") for m in data.get("data", [])}

    async def load(self, name: str, path: str) -> None:
        """Load adapter ``path`` as ``name``. Never ``load_inplace``: it re-reads the file every step."""
        await self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload(self, name: str) -> None:
        await self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})

    async def probe(self, name: str) -> None:
        """One token through ``name``: proves the adapter answers, not only that it loaded."""
        await self._call("POST", "/v1/completions",
                         {"model": name, "prompt": "ping", "max_tokens": 1, "temperature": 0})

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    timeout: aiohttp.ClientTimeout = _CONTROL_TIMEOUT) -> dict[str, Any]:
        try:
            async with self.session.request(method, self.url + path, json=body,
                                            timeout=timeout) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise UpstreamError(self.url, resp.status, error_message(raw))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(self.url, 0, f"{type(exc).__name__}: {exc}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            return {"text": raw.decode(errors="replace")}
        return data if isinstance(data, dict) else {"data": data}
