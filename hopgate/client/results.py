"""Typed /score answers for ``hopgate.client``: frozen dataclasses that mirror the service's
response schema (service/schema.py) without importing the service, so the client runs where
only httpx, numpy and Pillow are installed.

A field the server sends that these classes do not know is kept, untouched, in ``raw`` (the
result's whole JSON object), so a newer server never breaks an older client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LOCAL = 0  # ErrorInfo.status of an image that never left the client (unreadable file, ...)


@dataclass(frozen=True)
class Memory:
    index: int  # class x M + memory; GET /memories/{index} shows it
    weight: float
    class_index: int | None = None  # the class the memory stands for (bundles that say so)
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # fields not known here


@dataclass(frozen=True)
class ErrorInfo:
    """Why one image (or the request it was in) was not scored. ``status`` is the HTTP status
    the service gave, or ``LOCAL`` (0) when the client could not read or encode the image."""

    status: int
    reason: str
    message: str


@dataclass(frozen=True)
class ClassProbability:
    """One of the classifier's top-k classes (``Client(top_k=K)``: the one-pass shape)."""

    class_index: int
    label: str
    probability: float
    logit: float | None = None  # with ``Client(logits=True)``


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass(frozen=True)
class Result:
    """One image's verdict, or its ``error``. ``score`` is higher for more ID-like images;
    ``ood`` is ``score < threshold``."""

    ood: bool | None = None
    score: float | None = None
    threshold: float | None = None
    p_value: float | None = None
    predicted_class: int | None = None
    label: str | None = None
    note: str | None = None  # on OOD results: the class is the classifier's guess
    memories: tuple[Memory, ...] = ()
    energy: float | None = None
    baselines: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None
    timings: Timings | None = None
    error: ErrorInfo | None = None
    probabilities: tuple[ClassProbability, ...] = ()  # with top_k: most probable first
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_ood(self) -> bool:
        return self.ood is True

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        err = d.get("error")
        t = d.get("timings")
        return cls(
            ood=d.get("ood"), score=d.get("score"), threshold=d.get("threshold"),
            p_value=d.get("p_value"), predicted_class=d.get("predicted_class"),
            label=d.get("label"), note=d.get("note"),
            memories=tuple(memory(m) for m in d.get("memories") or ()),
            energy=d.get("energy"), baselines=dict(d.get("baselines") or {}),
            model_version=d.get("model_version"),
            timings=Timings(t["queue_ms"], t["compute_ms"], t["batch_size"]) if t else None,
            error=error_info(err) if isinstance(err, dict) else None,
            probabilities=tuple(
                ClassProbability(int(p["class_index"]), str(p["label"]),
                                 float(p["probability"]), p.get("logit"))
                for p in d.get("probabilities") or ()),
            raw=d)

    @classmethod
    def failed(cls, status: int, reason: str, message: str) -> Result:
        return cls(error=ErrorInfo(status, reason, message))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    provider: str
    threshold: float
    target_tpr: float
    classes: tuple[str, ...]
    hopgate_version: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(d["name"], d["version"], d["provider"], float(d["threshold"]),
                   float(d["target_tpr"]), tuple(d["classes"]), d["hopgate_version"])


_MEMORY = ("index", "weight", "class_index", "label")


def memory(m: dict[str, Any]) -> Memory:
    return Memory(int(m["index"]), float(m["weight"]), m.get("class_index"), m.get("label"),
                  {k: v for k, v in m.items() if k not in _MEMORY})


def error_info(d: dict[str, Any]) -> ErrorInfo:
    return ErrorInfo(int(d.get("status", 0)), str(d.get("reason", "")),
                     str(d.get("message", "")))


class ScoreError(Exception):
    """A whole request failed: refused (401, 413, ...), still overloaded after the retries
    (429/503), or the server could not be reached. ``status`` is 0 when no answer came."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status, self.reason, self.message = status, reason, message
