"""The OpenAI API's shapes, without I/O: request validation, stop strings, response objects.

``parse_request`` turns a decoded JSON body of ``/v1/completions`` or ``/v1/chat/completions`` into
a :class:`CompletionRequest` or raises :class:`ApiError` (OpenAI's error JSON and an HTTP status).
:class:`StopScanner` cuts generated text at the first stop string, holding back text that may be the
start of one so a stream never shows part of a stop string. The builders return plain dicts.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class CompletionRequest:
    """A validated request. ``messages`` is set for chat, ``prompt`` for plain completions."""

    chat: bool
    model: str
    messages: tuple[Mapping[str, str], ...] = ()
    prompt: str = ""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # extension (as vLLM's): token ids in each choice

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float,
            *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number", param=name, code="invalid_type")
    if value > hi or value < lo or (lo_open and value == lo):
        raise bad_request(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", param=name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", param=name, code="invalid_type")
    return value


def _content(value: Any, i: int) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            text = part.get("text") if isinstance(part, dict) else None
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(text, str)):
                raise bad_request(f"messages[{i}].content: only text parts are supported",
                                  param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string", param=f"messages[{i}].content",
                      code="invalid_type")


def _messages(value: Any) -> tuple[Mapping[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty array", param="messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        role = msg.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}",
                              param=f"messages[{i}].role")
        out.append({"role": role, "content": _content(msg.get("content"), i)})
    return tuple(out)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # the API allows an array of prompts; one is supported
    if not isinstance(value, str):
        raise bad_request("prompt must be a string (one prompt per request)", param="prompt",
                          code="invalid_type")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stops)):
        raise bad_request(f"stop must be a string or up to {MAX_STOP_STRINGS} non-empty strings "
                          f"of at most {MAX_STOP_LENGTH} characters", param="stop")
    return tuple(stops)


def parse_request(body: Any, *, chat: bool) -> CompletionRequest:
    """Validate a decoded JSON body. Raises ApiError (400) naming the offending parameter.
    Parameters this server does not use (``user``, penalties, ...) are ignored, as llama.cpp does."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required", param="model", code="missing_required_parameter")
    n = _integer(body, "n", 1, 1 << 30)
    if n not in (None, 1):
        raise bad_request("only n=1 is supported", param="n")
    max_tokens = _integer(body, "max_completion_tokens", 0, 1 << 30)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 0, 1 << 30)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options", code="invalid_type")
    seed = _integer(body, "seed", -(1 << 63), (1 << 64) - 1)
    return CompletionRequest(
        chat=chat, model=model,
        messages=_messages(body.get("messages")) if chat else (),
        prompt="" if chat else _prompt(body.get("prompt")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=None if seed is None else seed % (1 << 64),  # numpy seeds are non-negative
        stop=_stop(body.get("stop")),
        stream=_flag(body, "stream"),
        include_usage=_flag(options or {}, "include_usage"),
        return_token_ids=_flag(body, "return_token_ids"),
    )


@dataclass
class StopScanner:
    """Feed text pieces; get back what is safe to show. ``stopped`` once a stop string appeared
    (the text up to it has been returned; nothing after it ever is)."""

    stops: Sequence[str]
    stopped: bool = False
    _held: str = field(default="", repr=False)

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = 0  # the longest tail of text that is the start of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation: whatever was held back (it was not a stop string)."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(req: CompletionRequest, rid: str, created: int, text: str, finish_reason: str,
                      prompt_ids: Sequence[int], new_ids: Sequence[int]) -> dict[str, Any]:
    """The non-streaming response of either endpoint."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if req.return_token_ids:
        choice["token_ids"] = list(new_ids)
    out: dict[str, Any] = {"id": rid, "object": req.kind, "created": created, "model": req.model,
                           "choices": [choice], "usage": usage(len(prompt_ids), len(new_ids))}
    if req.return_token_ids:
        out["prompt_token_ids"] = list(prompt_ids)
    return out


def chunk_object(req: CompletionRequest, rid: str, created: int, *, text: str | None = None,
                 role: bool = False, finish_reason: str | None = None,
                 token_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """One streamed chunk (``chat.completion.chunk`` or ``text_completion``)."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if req.chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if req.return_token_ids and token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: CompletionRequest, rid: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The final chunk of ``stream_options.include_usage``: no choices, only usage."""
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def models_object(model_id: str, created: float | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model",
                                        "created": int(created or time.time()), "owned_by": "idlefleet"}]}
