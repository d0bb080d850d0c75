"""The model bundle contract: one ``.onnx`` file whose ``metadata_props`` describe it completely.

This module is the single definition of that contract. ``model_export`` writes it
(``BundleMeta.to_props``) and the service reads it (``load_meta``); neither keeps its own
copy of the key names. It imports neither torch nor onnxruntime, so both sides can use it.

Graph I/O (fixed names):
  inputs   images      uint8 [B, H, W, C]   at the bundle's size; cast/normalise happen in-graph
           log_lambda  optional float32 scalar  the log-domain threshold; left out, the
                                             calibrated one (an If on OptionalHasElement; older
                                             bundles: an initializer that is also an input)
  outputs  score       float32 [B]     the gate's deciding score, min over t <= T of
                                       lse(a_t) on the ungated trajectory: higher = more ID
           is_ood      bool    [B]     the state fell into the origin attractor; equals
                                       score < threshold (the build checks it)
           pred_class  int64   [B]
           memory_index int64  [B, k]  global memory index, -1 where is_ood
           memory_weight float32 [B, k] softmax weight of that memory, 0 where is_ood
           energy      float32 [B]     Lyapunov energy of the final state (reclag.hopfield_energy)
           msp         float32 [B]     max softmax probability (baseline score)
           energy_score float32 [B]    logsumexp(logits) (baseline score)
  optional logits      float32 [B, C]  the classifier's own logits (attached bundles, and
                                       built ones since it was added): /score's ``top_k``
                                       probabilities, V2's ``probabilities`` output
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from hopgate.pixels import Resize

FORMAT_VERSION = 1
PREFIX = "hopgate."

INPUT_IMAGES = "images"
INPUT_LOG_LAMBDA = "log_lambda"
OUTPUTS = (
    "score",
    "is_ood",
    "pred_class",
    "memory_index",
    "memory_weight",
    "energy",
    "msp",
    "energy_score",
)
LOGITS = "logits"  # optional output (the one-pass shape: docs/deploy.md)


def served_outputs(names: object) -> tuple[str, ...]:
    """The outputs a server fetches from a graph whose outputs are ``names``."""
    return (*OUTPUTS, LOGITS) if LOGITS in names else OUTPUTS  # type: ignore[operator]


class BundleError(ValueError):
    """A file that is not a usable hopgate bundle; the message names what is wrong."""


class MemoryExemplars(BaseModel):
    """What each memory stands for: its class and a few training images retrieved to it with
    the highest weight (``model_export.exemplars`` computes them by running the bundle itself).
    Lists are in global memory order (class x M + memory); thumbnails are base64 PNG, at most
    ``size`` pixels, best first; a memory no training image was retrieved to has none."""

    source: str  # the images they were drawn from, e.g. "fashion_mnist train, 12000 images"
    size: list[int]  # [height, width] bound of the thumbnails
    classes: list[int]  # the class of each memory
    images: list[list[str]]  # per memory: base64 PNG thumbnails


class BundleMeta(BaseModel):
    """Everything the service needs to know about a bundle, stored as ``hopgate.*`` props."""

    format_version: int = FORMAT_VERSION
    hopgate_version: str
    name: str = "default"
    model_version: str
    # input
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    resize: Literal["stretch", "center_crop", "shorter_side"] = "stretch"
    # the classifier's own filter and centre crop (hopgate.pixels.Resize); bundles made before
    # these keys existed load with today's policy: auto filter (Lanczos down), no crop
    resize_filter: Literal["auto", "nearest", "bilinear", "bicubic", "lanczos", "box"] = "auto"
    crop: float = Field(1.0, gt=0, le=1)
    mean: list[float]
    std: list[float]
    # classifier
    class_names: list[str]
    backbone: str
    # memory
    method: str = "reclag"  # reclag | dam
    lagrangian: str = "lse"  # lse | rep_n
    power_n: int | None = None
    beta: float
    bank: Literal["per_class", "shared"] = "per_class"
    memories_per_class: int
    steps: int = Field(ge=0)
    top_k: int = Field(gt=0)
    # optional (bundles made before they existed load with these defaults)
    geometry: Literal["dot", "gaussian"] = "dot"  # gaussian: whitened, lifted (reclag.md §10)
    radius: float | None = None  # gaussian: the shift R
    rectified: bool = True
    feature_norm: float | None = None
    exemplars: MemoryExemplars | None = None  # hopgate-export exemplars adds them
    # calibration
    threshold: float  # log-domain threshold tau = log(lambda); OOD iff score < tau
    target_tpr: float = Field(gt=0, lt=1)
    score_quantiles: list[float]  # sorted ID calibration scores (or a quantile table) for p-values
    calibration_size: int = Field(gt=0)
    # provenance
    data_fingerprint: str
    created: str

    @model_validator(mode="after")
    def _exemplars_cover_memories(self) -> BundleMeta:
        e = self.exemplars
        if e is not None and not len(e.classes) == len(e.images) == self.memory_count:
            raise ValueError(f"exemplars: {len(e.classes)} classes and {len(e.images)} image "
                             f"lists for {self.memory_count} memories")
        return self

    @property
    def memory_count(self) -> int:
        """Memories in the bundle: M per class, or M x classes in one shared bank."""
        return len(self.class_names) * self.memories_per_class

    @property
    def pixels(self) -> Resize:  # Pillow is imported only where an image is resized
        """The resize policy the service decodes with: exactly what the bundle states."""
        from hopgate.pixels import Resize

        return Resize(self.resize, self.resize_filter, self.crop)

    def memory_class(self, index: int) -> int | None:
        """The class a memory stands for: per-class banks know it; a shared bank's comes
        from its exemplars (None without them)."""
        if self.exemplars is not None:
            return self.exemplars.classes[index]
        return index // self.memories_per_class if self.bank == "per_class" else None

    def to_props(self) -> dict[str, str]:
        return {PREFIX + k: json.dumps(v) for k, v in self.model_dump().items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "bundle") -> BundleMeta:
        ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not ours:
            raise BundleError(f"{source}: no hopgate metadata (not a hopgate bundle?)")
        try:
            version = int(json.loads(ours.get("format_version", "null")))
        except (TypeError, ValueError):
            raise BundleError(f"{source}: missing or unreadable hopgate.format_version") from None
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{source}: bundle format {version} was made by hopgate "
                f"{ours.get('hopgate_version', '?')}; "
                f"this hopgate reads format {FORMAT_VERSION} only"
            )
        try:
            values = {k: json.loads(v) for k, v in ours.items()}
        except json.JSONDecodeError as e:
            raise BundleError(f"{source}: metadata value is not JSON: {e}") from None
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            problems = "; ".join(
                f"hopgate.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
            )
            raise BundleError(f"{source}: bad bundle metadata: {problems}") from None

    def p_value(self, score: float) -> float:
        """Conformal p-value: share of ID calibration scores at or below ``score`` (+1 smoothed).

        ``score_quantiles`` is an evenly spaced quantile table of the ID calibration scores,
        so the rank is interpolated between its entries.
        """
        q = self.score_quantiles
        n = len(q)
        rank = bisect.bisect_right(q, score)
        pos = float(rank)
        if 0 < rank < n:  # interpolate within the bracketing quantiles
            lo, hi = q[rank - 1], q[rank]
            pos = rank - 1 + ((score - lo) / (hi - lo) if hi > lo else 1.0)
        frac = pos / n
        m = self.calibration_size
        return (1.0 + frac * m) / (m + 1.0)


def load_meta(path: str | Path) -> BundleMeta:
    """Read and validate the metadata of an ``.onnx`` bundle without building a session."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file")
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
    except ImportError:  # serving image without the onnx package: ask onnxruntime
        props = _props_via_onnxruntime(path)
    except Exception as e:  # protobuf DecodeError and friends
        raise BundleError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    return BundleMeta.from_props(props, source=str(path))


def _props_via_onnxruntime(path: Path) -> dict[str, str]:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BundleError(f"{path}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    return dict(sess.get_modelmeta().custom_metadata_map)
