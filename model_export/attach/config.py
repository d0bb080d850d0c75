"""The attach config: how the user's classifier wants its pixels, and how its gate is fitted.

``hopgate-export attach --config attach.yaml``; every field has a default, unknown keys and
wrong types are errors naming the field (pydantic, ``extra="forbid"``, as config.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hopgate.pixels import Resize

from ..config import CalibrateConfig, MemoryConfig, load_config


class AttachError(ValueError):
    """The classifier or its config cannot be attached to; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preprocess(_Strict):
    """The classifier's input, from the uint8 pixels the service decodes:
    x = (pixel / scale - mean) / std per channel, in ``channel_order``, laid out ``layout``."""

    size: tuple[int, int] = (224, 224)  # (height, width) the classifier takes
    channels: Literal[1, 3] = 3
    # how an image is fitted to ``size`` (hopgate.pixels.Resize): stretch, center_crop (the
    # centred square) or shorter_side (aspect kept); the filter (auto: Lanczos down, bilinear
    # up); crop: the centred share kept after resizing to size / crop (torchvision's 256 -> 224
    # is shorter_side with crop 0.875)
    resize: Literal["stretch", "center_crop", "shorter_side"] = "stretch"
    resize_filter: Literal["auto", "nearest", "bilinear", "bicubic", "lanczos", "box"] = "auto"
    crop: float = Field(1.0, gt=0, le=1)
    scale: float = Field(255.0, gt=0)  # 255: pixels to [0, 1] first; 1: keep 0..255
    mean: list[float] = [0.0]  # one value: the same for every channel
    std: list[float] = [1.0]
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    # true: the classifier normalises inside its graph and takes 0..255 pixels (float or
    # uint8, as its input says): scale 1, no mean/std; a scale/mean/std given as well is an error
    in_graph: bool = False

    @property
    def pixels(self) -> Resize:
        return Resize(self.resize, self.resize_filter, self.crop)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        """The classifier's input shape for ``batch`` images."""
        h, w = self.size
        c = self.channels
        return (batch, c, h, w) if self.layout == "NCHW" else (batch, h, w, c)

    @model_validator(mode="after")
    def _per_channel(self) -> Preprocess:
        if self.in_graph:
            given = sorted({"scale", "mean", "std"} & self.model_fields_set)
            if given:
                raise ValueError(f"in_graph: true means no scaling and no mean/std; remove "
                                 f"{', '.join(given)}")
            self.scale, self.mean, self.std = 1.0, [0.0], [1.0]
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) == 1:
                setattr(self, name, values * self.channels)
            elif len(values) != self.channels:
                raise ValueError(f"{name} has {len(values)} values for {self.channels} channels")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self


# Under the config's own memory/calibrate keys (a partial section keeps the rest): the gate
# variant configs/default.yaml ships (reclag.md §10; a test keeps them equal), whitened
# features, per-class k-means centres, the lifted Gaussian geometry; and its calibration.
DEFAULTS: dict[str, dict] = {
    "memory": {"geometry": "gaussian", "beta": 1.0, "memories": 10, "steps": 1,
               "init": "kmeans", "kmeans_n_init": 4, "feature_norm": None,
               "epochs": 0},
    "calibrate": {"client_path": 0.5},
}


def auto_shrinkage(images: int, dim: int) -> float | None:
    """The whitening's shrinkage when the config leaves it unset: none (default.yaml's 0.0)
    with at least 10 training images per feature dimension, else Ledoit-Wolf's estimate
    (None). Measured (docs/attach.md): 32-d features from 525 images are best unshrunk; 1,280-d
    from 416 make the covariance singular and the unshrunk build is refused."""
    return 0.0 if images >= 10 * dim else None


class AttachConfig(_Strict):
    name: str = "attached"
    seed: int = 0
    output: Path = Path("models/attached.onnx")
    preprocess: Preprocess = Preprocess()
    # the classifier's class names in index order (None: "0", "1", ...)
    class_names: list[str] | None = None
    # folder name -> the classifier's class index. None: folders named like class_names are
    # mapped by name; otherwise the classifier's own predictions are the labels.
    labels: dict[str, int] | None = None
    logits: str | None = None  # the graph output holding the logits (None: the only one)
    features: str | None = None  # the penultimate tensor (None: found, see surgery.py)
    holdout_fraction: float = Field(0.3, gt=0, lt=0.9)  # calibration split of the folder
    memory: MemoryConfig = MemoryConfig()  # DEFAULTS["memory"] under what the config says
    calibrate: CalibrateConfig = CalibrateConfig()
    # check the classifier against the folder before fitting (guard.py); false: skip it, for
    # a folder whose sub-folders are not the classifier's classes (the build says so)
    check: bool = True
    opset: int = Field(18, ge=18)  # the least opset: an older classifier is converted up
    parity_images: int = Field(256, ge=1)
    ood_images: int = Field(100, ge=1)  # per far-OOD kind in the build's AUROC report
    # the built-in far-OOD sets of the report ([] = none) and the user's own (folder:DIR,
    # every image under it); a built-in set scoring like ID (AUROC < 0.6) is left out of the
    # headline and named ("looks like your data")
    ood_sets: list[Literal["noise", "digits", "glyphs", "faces", "fashion_mnist"]] = [
        "noise", "digits", "glyphs", "faces", "fashion_mnist"]
    ood_folders: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _attach_defaults(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            for key, base in DEFAULTS.items():
                given = data.get(key) or {}
                if isinstance(given, dict):
                    data[key] = {**base, **given}
        return data


def load_attach_config(path: str | Path | None, overrides: dict | None = None) -> AttachConfig:
    """Read a YAML/JSON attach config (None = defaults); ``overrides`` are dotted keys."""
    return load_config(path, overrides, AttachConfig)
