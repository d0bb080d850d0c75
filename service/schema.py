"""The /score response schema: these models build every /score response, so the OpenAPI
document and what goes over the wire are one and the same.

A result carries either the verdict fields or only ``error``; the gate (gate.py) adds
``upstream`` (the upstream's answer) or ``held_back`` (an OOD image it never forwarded).
Responses are rendered with ``exclude_unset``: a field that was never set is absent, not
``null`` (a failed image has only ``error``; gate fields appear only in gatekeeper mode).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict


class Memory(BaseModel):
    index: int  # class x M + memory
    weight: float


class ErrorInfo(BaseModel):
    status: int
    reason: str
    message: str


class Timings(BaseModel):
    queue_ms: float
    compute_ms: float
    batch_size: int


class UpstreamAnswer(BaseModel):
    """The upstream classifier's answer to a forwarded image, or why there is none."""

    status: int
    body: Any = None  # the upstream's JSON (or text) body
    error: str | None = None  # set when the upstream was unreachable or too slow


class ImageResult(BaseModel):
    ood: bool | None = None
    score: float | None = None
    threshold: float | None = None
    p_value: float | None = None
    predicted_class: int | None = None
    label: str | None = None
    memories: list[Memory] | None = None
    energy: float | None = None
    baselines: dict[str, float] | None = None
    model_version: str | None = None
    timings: Timings | None = None
    error: ErrorInfo | None = None
    # gatekeeper mode only
    upstream: UpstreamAnswer | None = None
    held_back: bool | None = None


class ModelInfo(BaseModel):
    name: str
    version: str
    provider: str
    threshold: float
    target_tpr: float
    classes: list[str]
    hopgate_version: str


class EncodedJSON(JSONResponse):
    """A JSON response whose body is already encoded (by pydantic-core, from the models
    here): the models' own serialiser, no dict copy and no second pass through json.dumps."""

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else super().render(content)


class ScoreResponse(BaseModel):
    """``{"results": [...], "model": {...}}``; in gatekeeper mode with ``fail_closed`` an
    upstream failure adds ``error``, and OOD answers may carry the operator's extra keys
    (``HOPGATE_GATE_OOD_BODY``)."""

    model_config = ConfigDict(extra="allow")

    results: list[ImageResult]
    model: ModelInfo
    error: ErrorInfo | None = None

    def render(self, status: int = 200, extra: dict[str, Any] | None = None) -> JSONResponse:
        if not extra:
            return EncodedJSON(self.model_dump_json(exclude_unset=True).encode(), status)
        return JSONResponse({**self.model_dump(exclude_unset=True), **extra}, status)
