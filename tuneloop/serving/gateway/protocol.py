"""Request and response shapes of the gateway: OpenAI's error format, checks, admin bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

# Headers on every answer: which version answered, and the id feedback refers to.
VERSION_HEADER = "x-tuneloop-adapter-version"
RESPONSE_ID_HEADER = "x-tuneloop-response-id"
ALIAS_HEADER = "x-tuneloop-alias"
USER_HEADER = "x-tuneloop-user"
# The token that lets the user who received an answer post feedback on it.
FEEDBACK_TOKEN_HEADER = "x-tuneloop-feedback-token"

M = TypeVar("M", bound=BaseModel)


class BadRequest(ValueError):
    """A request the gateway refuses before it reaches vLLM (HTTP 4xx)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


def error_response(status: int, message: str, *, kind: str | None = None,
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    """An error body as OpenAI's API writes it, so the official client raises the right type."""
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or status}}
    return Response(json.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def load_json(raw: bytes, max_depth: int) -> Any:
    """``raw`` decoded as JSON nested at most ``max_depth`` deep; raises
    :class:`BadRequest` for anything else (never a bare error of the parser)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"the JSON body is nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise BadRequest(f"the JSON body is nested deeper than {max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value


def check_limits(body: dict[str, Any], max_tokens: int, max_n: int) -> None:
    """Refuse (:class:`BadRequest`) a token budget or a number of choices beyond the
    gateway's limits (``serving.max_tokens``, ``serving.max_n``)."""
    for name, most, setting in (("max_tokens", max_tokens, "max_tokens"),
                                ("max_completion_tokens", max_tokens, "max_tokens"),
                                ("n", max_n, "max_n"), ("best_of", max_n, "max_n")):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            raise BadRequest(f"'{name}' must be a whole number from 1 to {most} "
                             f"(serving.{setting} on this gateway)", param=name)


def parse_model(model: type[M], raw: bytes, max_depth: int = 32) -> M:
    """An admin or feedback body as ``model``; raises :class:`BadRequest` naming the field."""
    try:
        return model.model_validate(load_json(raw or b"{}", max_depth))
    except BadRequest:
        raise
    except (ValueError, ValidationError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in detail["loc"]) if detail else None
        message = f"{where}: {detail['msg']}" if detail else f"invalid JSON: {exc}"
        raise BadRequest(message, param=where) from None


def observation_window(query: Mapping[str, str]) -> tuple[float, float | None]:
    """``since`` and ``until`` of ``GET /admin/observations`` (epoch seconds; no ``until``:
    now); raises :class:`BadRequest` when either is not a number."""
    try:
        since = float(query.get("since", "0"))
        until = float(query["until"]) if "until" in query else None
    except ValueError:
        raise BadRequest("since, until: seconds since the epoch, e.g. 1795000000.5",
                         param="since") from None
    return since, until


def parse_body(raw: bytes, max_depth: int = 32) -> dict[str, Any]:
    """An inference request's JSON object with its ``model``; raises :class:`BadRequest`."""
    body = load_json(raw, max_depth)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: the alias to answer with (see GET /v1/models)",
                         param="model")
    return body


def check_chat(body: dict[str, Any]) -> list[dict[str, str]]:
    """The chat's turns as plain role/content text; raises :class:`BadRequest`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", param="messages")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] needs a 'role' and 'content'", param="messages")
        role = "system" if message["role"] == "developer" else str(message["role"])
        turns.append({"role": role, "content": _text(message.get("content"))})
    return turns


def with_system_prompt(body: dict[str, Any], turns: list[dict[str, str]], prompt: str
                       ) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A chat request and its turns with the task's system prompt first, unless the client
    sent a system turn of its own (kept as it is)."""
    if any(t["role"] == "system" for t in turns):
        return body, turns
    system = {"role": "system", "content": prompt}
    return dict(body, messages=[system, *body["messages"]]), [system, *turns]


# vLLM's own answer constraints: any of them and the task's schema is not added.
VLLM_CONSTRAINTS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                    "guided_grammar")


def client_constrains(body: dict[str, Any]) -> bool:
    """True when the request shapes the answer itself: a ``response_format``, tools to
    call (a non-empty ``tools`` or ``functions``), or one of :data:`VLLM_CONSTRAINTS`."""
    return body.get("response_format") is not None or bool(body.get("tools")) or bool(
        body.get("functions")) or any(body.get(k) is not None for k in VLLM_CONSTRAINTS)


def with_response_format(body: dict[str, Any], response_format: dict[str, Any] | None
                         ) -> dict[str, Any]:
    """A chat request with the task's ``response_format`` (a json alias's schema), unless it
    names none or the client constrains the answer itself (:func:`client_constrains`:
    the request is kept as it is)."""
    if response_format is None or client_constrains(body):
        return body
    return dict(body, response_format=response_format)


def check_completion(body: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt as one user turn; raises :class:`BadRequest`."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' must be one string (batched prompts are not routed)",
                         param="prompt")
    return [{"role": "user", "content": prompt}]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def completion_text(data: dict[str, Any], chat: bool) -> str:
    """The first choice's text of a (non-streamed) answer."""
    choices = data.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    if chat:
        return str((first.get("message") or {}).get("content") or "")
    return str(first.get("text") or "")


def completion_tokens(data: dict[str, Any]) -> int | None:
    """The output tokens a (non-streamed) answer's ``usage`` reports, or None."""
    usage = data.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 \
        else None


class StreamAnswer(NamedTuple):
    """What a server-sent-event stream of chunks carried."""

    text: str
    upstream_id: str | None
    tokens: int | None  # output tokens: the last ``usage``, else the chunks with text


def stream_answer(raw: bytes, chat: bool) -> StreamAnswer:
    """The text, id and output tokens of a server-sent-event stream, in one pass. The
    tokens are its last ``usage`` where the client asked for it
    (``stream_options.include_usage``; with ``continuous_usage_stats`` every chunk carries
    the count so far), else the chunks that carry text (vLLM sends one a decoding step),
    or None for an empty stream."""
    parts: list[str] = []
    upstream_id, reported = None, None
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            chunk = json.loads(line[6:])
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        upstream_id = upstream_id or chunk.get("id")
        reported = completion_tokens(chunk) or reported
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            piece = (delta.get("content") if isinstance(delta, dict) else None) if chat \
                else choice.get("text")
            if piece:
                parts.append(piece)
    return StreamAnswer("".join(parts), upstream_id, reported or len(parts) or None)


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: a verdict on one answer the gateway served."""

    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=256,
                             description="The x-tuneloop-response-id header, or the answer's id.")
    token: str = Field(min_length=1, max_length=128,
                       description="The x-tuneloop-feedback-token header of that answer: only "
                       "the user who received it can post a verdict on it.")
    rating: float | None = Field(None, ge=-1, le=1, description="-1 (bad) .. 1 (good).")
    correction: str | None = Field(None, description="The ideal answer.")
    label: str | None = Field(None, max_length=256, description="The task label, e.g. the intent.")
    preferred_response_id: str | None = Field(
        None, min_length=1, max_length=256, description="Side by side: of this answer and "
        "the candidate's unseen answer to the same request (GET /v1/feedback/pair), the "
        "response id of the better one.")
    metadata: dict[str, Any] = Field(default_factory=dict)


class RouteRequest(BaseModel):
    """``POST /admin/route``: the new routing of an alias. Omitted fields keep their value."""

    model_config = ConfigDict(extra="forbid")

    alias: str | None = None
    production: str | None = Field(None, description="Version, or null for the base model.")
    candidate: str | None = Field(None, description="Version under canary, or null for none.")
    canary_share: float | None = Field(None, ge=0, le=1)
    shadow_share: float | None = Field(None, ge=0, le=1)


class VersionRequest(BaseModel):
    """``POST /admin/load`` and ``/admin/unload``."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=r"^v\d+$")
    alias: str | None = None
