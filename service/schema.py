"""The /score response schema: these models build every /score response, so the OpenAPI
document and what goes over the wire are one and the same.

A result carries either the verdict fields or only ``error``; the gate (sidecar/gate.py) adds
``upstream`` (the upstream's answer) or ``held_back`` (an OOD image it never forwarded).
Responses are rendered with ``exclude_unset``: a field that was never set is absent, not
``null`` (a failed image has only ``error``; gate fields appear only in gatekeeper mode).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hopgate.bundle import BundleMeta

OOD_NOTE = ("OOD: predicted_class and label are the classifier's guess outside the domain it "
            "was trained on; do not trust them")


class Memory(BaseModel):
    index: int = Field(description="Global memory index (class x M + memory); "
                                   "GET /memories/{index} shows its class and exemplars")
    weight: float = Field(description="Softmax weight of this memory in the retrieval (0-1)")
    class_index: int | None = Field(None, description="The class this memory stands for")
    label: str | None = Field(None, description="That class's name")


def named_memory(meta: BundleMeta, index: int, weight: float) -> Memory:
    """A retrieved memory with the class it stands for (when the bundle knows it)."""
    c = meta.memory_class(index)
    if c is None or not 0 <= c < len(meta.class_names):
        return Memory(index=index, weight=weight)
    return Memory(index=index, weight=weight, class_index=c, label=meta.class_names[c])


class ClassProbability(BaseModel):
    class_index: int = Field(description="The class index")
    label: str = Field(description="That class's name")
    probability: float = Field(description="The classifier's softmax probability of it")
    logit: float | None = Field(None, description="Its logit (with ?logits=true)")


class ErrorInfo(BaseModel):
    status: int = Field(description="HTTP status of this error")
    reason: str = Field(description="Machine-readable reason (the reason label of "
                                    "hopgate_requests_total), e.g. bad_input, queue_full")
    message: str = Field(description="What went wrong, for a person")


class Timings(BaseModel):
    queue_ms: float = Field(description="Time the image waited for a batch, ms")
    compute_ms: float = Field(description="onnxruntime time of its batch, ms")
    batch_size: int = Field(description="Images in its batch (before padding)")


class UpstreamAnswer(BaseModel):
    """The upstream classifier's answer to a forwarded image, or why there is none."""

    status: int = Field(description="The upstream's HTTP status")
    body: Any = Field(None, description="The upstream's JSON (or text) body")
    error: str | None = Field(None, description="Set when the upstream was unreachable or "
                                                "too slow")


class ImageResult(BaseModel):
    """One image's verdict, or only ``error`` when it failed alone."""

    ood: bool | None = Field(None, description="True: out of distribution (unlike the "
                             "training data); equals score < threshold")
    score: float | None = Field(None, description="Gate score, log-domain; higher = more "
                                "like the training data")
    threshold: float | None = Field(None, description="The log-domain threshold applied: the "
                                    "bundle's calibrated one unless the request set its own "
                                    "(target_tpr / log_lambda); OOD iff score < threshold")
    p_value: float | None = Field(None, description="Share of ID calibration images scoring "
                                  "at or below this score (small = unusual)")
    predicted_class: int | None = Field(None, description="The classifier's class index; for "
                                        "an OOD image only its guess outside its domain")
    label: str | None = Field(None, description="Name of predicted_class")
    note: str | None = Field(None, description="Set on OOD results: predicted_class is the "
                             "classifier's guess outside its domain")
    memories: list[Memory] | None = Field(None, description="Memories the image was "
                                          "retrieved to, by weight; empty when OOD")
    energy: float | None = Field(None, description="Hopfield energy of the final state")
    baselines: dict[str, float] | None = Field(None, description="Cheap baseline scores: msp "
                                               "(max softmax), energy (logsumexp of logits)")
    probabilities: list[ClassProbability] | None = Field(
        None, description="With ?top_k=K, on a bundle that carries the classifier's logits: "
                          "its K most probable classes, most probable first (the one-pass "
                          "shape: no second forward pass on the classifier)")
    model_version: str | None = Field(None, description="Version of the bundle that scored it")
    timings: Timings | None = Field(None, description="Where the time went")
    error: ErrorInfo | None = Field(None, description="Why this image failed (then the only "
                                    "field)")
    # gatekeeper mode only
    upstream: UpstreamAnswer | None = Field(None, description="Gatekeeper mode: the upstream "
                                            "classifier's answer to this ID image")
    held_back: bool | None = Field(None, description="Gatekeeper mode: an OOD image that was "
                                   "never forwarded")

    @model_validator(mode="after")
    def _say_ood_class_is_a_guess(self) -> ImageResult:
        if self.ood and self.note is None:  # set, so it is rendered (exclude_unset)
            self.note = OOD_NOTE
        return self


class ModelInfo(BaseModel):
    name: str = Field(description="Bundle name")
    version: str = Field(description="Bundle version (name, data fingerprint, seed)")
    provider: str = Field(description="onnxruntime execution provider")
    threshold: float = Field(description="Calibrated log-domain threshold")
    target_tpr: float = Field(description="Share of ID images the threshold was set to keep")
    classes: list[str] = Field(description="Class names, by class index")
    hopgate_version: str = Field(description="hopgate version serving it")


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
