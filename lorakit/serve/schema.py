"""The OpenAPI description of the request and error bodies (the handlers read raw JSON and validate it in
protocol.py, so FastAPI cannot infer these): what /openapi.json shows clients, and what the HTTP fuzzer
(tests/test_serve_fuzz.py, benchmarks/serve_fuzz.py) generates requests from."""
from __future__ import annotations

from typing import Any

_TEXT = {"type": "string", "minLength": 1}
_STOP = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "maxItems": 4}, {"type": "null"}]}
_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1, "description": "'base' or a served adapter (GET /v1/models)"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": ["integer", "null"]},
    "stop": _STOP,
    "stream": {"type": "boolean"},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
}

COMPLETION = {
    "type": "object", "required": ["model", "prompt"],
    "properties": {**_SAMPLING, "prompt": {"anyOf": [
        _TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]}},
}
CHAT = {
    "type": "object", "required": ["model", "messages"],
    "properties": {**_SAMPLING, "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
                   "messages": {"type": "array", "minItems": 1, "items": {
                       "type": "object", "required": ["role", "content"],
                       "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                                      "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
                                          "type": "object", "required": ["type", "text"],
                                          "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}}},
}
LOAD_ADAPTER = {
    "type": "object", "required": ["name", "path"],
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
                   "path": {"type": "string", "minLength": 1,
                            "description": "a folder inside --adapters-dir (relative to it, or absolute)"}},
}
ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}},
}


def body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON request body, and OpenAI's error body for every refusal."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {"application/json": {"schema": schema}}},
            "responses": errors()}


def errors() -> dict[str, Any]:
    return {"4XX": {"description": "refused: OpenAI's error body", "content": {"application/json": {"schema": ERROR}}}}
