"""The OpenAI wire format: request validation (every problem a 4xx with OpenAI's error body), limits,
and the shapes of responses and stream chunks for /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .engine import SamplingParams


@dataclass
class Limits:
    """What one request may ask for; anything beyond is refused with a 4xx, never truncated silently."""

    max_tokens: int = 512
    """Most tokens one request may generate (`max_tokens` above this is refused)."""
    max_prompt_tokens: int = 2048
    """Longest prompt, in tokens, after the chat template."""
    max_concurrent: int = 64
    """Requests generating or waiting at once; more get 429."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 beyond)."""
    context_length: Optional[int] = None
    """The model's context window (prompt + generated tokens); None = no check."""


class ApiError(Exception):
    """An error sent as {"error": {"message", "type", "param", "code"}} with HTTP `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """A validated generation request: the text to tokenize (or ids), the adapter and how to sample."""

    model: str
    prompt_text: Optional[str]
    prompt_ids: Optional[list[int]]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool


# Fields we know but do not implement: refused unless absent, null or at their neutral value (n=0 is refused:
# OpenAI refuses it too, it is not "one choice").
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": False, "top_logprobs": None,
                "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "suffix": "",
                "tools": [], "tool_choice": None, "response_format": None}
_ROLES = ("system", "developer", "user", "assistant")
MAX_JSON_DEPTH = 32  # OpenAI's bodies nest 4 deep; deeper is refused before anything walks it recursively


def _neutral(value: Any, neutral: Any) -> bool:
    if value is None:
        return True
    if isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    if isinstance(neutral, int):
        return type(value) in (int, float) and value == neutral and (neutral == 0 or type(value) is int)
    return type(value) is type(neutral) and value == neutral


def check_json(body: Any) -> None:
    """Refuse what the JSON parser lets through but nothing after it should see: nesting deeper than
    MAX_JSON_DEPTH and strings holding lone surrogates ("\\ud800"), which are not Unicode text (the tokenizer
    and the UTF-8 encoder both fail on them). Iterative, so a deep body cannot exhaust the stack here."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                           "valid Unicode text", code="invalid_json") from None


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, got {value}", name,
                       "max_tokens_exceeded" if name.startswith("max_") else "out_of_range")
    return value


def _common(body: Any, limits: Limits, default_max_tokens: int) -> tuple[str, SamplingParams, list[str], bool, bool]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: 'base' or the name of a served adapter (GET /v1/models)", "model")
    for name, neutral in _UNSUPPORTED.items():
        if not _neutral(body.get(name), neutral):
            shown = repr(body[name]) if len(repr(body[name])) <= 60 else "this value"
            raise ApiError(400, f"{name}={shown} is not supported by lorakit serve", name, "unsupported")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, min(default_max_tokens, limits.max_tokens), 1, limits.max_tokens, integer=True)
    params = SamplingParams(max_tokens=max_tokens,
                            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
                            seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True))
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return model, params, stop, stream, bool(options.get("include_usage"))


def parse_completion(body: Any, limits: Limits) -> ParsedRequest:
    """POST /v1/completions: `prompt` is a string, a one-string list, or a list of token ids."""
    model, params, stop, stream, usage = _common(body, limits, default_max_tokens=16)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt must not be empty", "prompt")
        return ParsedRequest(model, prompt, None, params, stop, stream, usage)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in prompt):
        return ParsedRequest(model, None, list(prompt), params, stop, stream, usage)
    if prompt is None:
        raise ApiError(400, "prompt is required", "prompt")
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def parse_chat(body: Any, limits: Limits) -> tuple[ParsedRequest, list[dict[str, str]]]:
    """POST /v1/chat/completions: `messages` as [{"role", "content"}], content a string or text parts."""
    model, params, stop, stream, usage = _common(body, limits, default_max_tokens=limits.max_tokens)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages is required: a non-empty list of {role, content}", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return ParsedRequest(model, None, None, params, stop, stream, usage), clean


def check_lengths(prompt_len: int, params: SamplingParams, limits: Limits) -> None:
    if prompt_len > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens}", "prompt", "context_length_exceeded")
    if limits.context_length and prompt_len + params.max_tokens > limits.context_length:
        raise ApiError(400, f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                       f"model's context of {limits.context_length} tokens", "max_tokens", "context_length_exceeded")


# ---------------------------------------------------------------------- responses
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(chat: bool, rid: str, model: str, text: str, finish: str, counts: dict) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": counts}


def chunk(chat: bool, rid: str, model: str, text: Optional[str], finish: Optional[str],
          first: bool = False) -> dict[str, Any]:
    """One server-sent event's payload, in OpenAI's chunk format."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


class TextAssembler:
    """Token ids -> text pieces, holding back incomplete characters and anything that may start a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text that is safe to send after `token`; sets `stopped` when a stop string appears."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.stopped = True
                return self._take(text[:at])
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._take(text[:len(text) - hold] if hold else text)

    def finish(self) -> str:
        """Whatever was held back, at the end of a generation that did not hit a stop string."""
        if self.stopped:
            return ""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece
