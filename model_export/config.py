"""The build config: one YAML/JSON file that drives train -> fit -> calibrate -> export.

Unknown keys and wrong types are errors that name the field (pydantic, ``extra="forbid"``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The memory settings' choices, named once: MemoryConfig validates them, fit.FitConfig and
# reclag.RecLagHead take them (recipe.py maps one onto the others).
Bank = Literal["per_class", "shared"]
Sampler = Literal["probs", "probs_as_logits"]  # probs_as_logits: the official code's quirk
Weights = Literal["log", "tf"]  # tf: float32 importance weights, as the official code
Init = Literal["sample", "kmeans"]
Lagrangian = Literal["lse", "rep_n"]
Geometry = Literal["dot", "gaussian"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    id: str = "fashion_mnist"  # fashion_mnist | folder:PATH | npz:PATH
    test: str | None = "fashion_mnist"  # ID test set for accuracy (same forms); None = none
    train_subset: int | None = Field(None, gt=0)  # first N (shuffled, seeded) training images
    test_subset: int | None = Field(None, gt=0)
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)  # calibration split, never trained on
    size: tuple[int, int] = (28, 28)
    channels: Literal[1, 3] = 1
    resize: Literal["stretch", "center_crop"] = "stretch"


class BackboneConfig(_Strict):
    name: str = "small_resnet"  # small_resnet | efficientnet_lite0 | package.module:factory
    epochs: int = Field(4, ge=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(0.1, gt=0)
    augment: bool = True
    # share of each batch sent along a random client path first (resized 28-448 px, JPEG/PNG,
    # the service's decode + fit: model_export.clientpath), so accuracy holds on served images
    client_path: float = Field(0.0, ge=0, le=1)
    mean: list[float] | None = None  # default: the backbone's own, else 0.5 per channel
    std: list[float] | None = None
    method: Literal["plain", "greg", "greg_plus"] = "plain"  # OOD training (see greg.md)


class GregConfig(_Strict):
    """GReg / GReg+ (model_export/greg.py, greg.md). Margins are in the classifier's energy
    units -LSE(logits): re-choose them for another backbone (greg.md §9.2)."""

    init: Path | None = None  # backbone.pt to fine-tune (GReg); None = train from scratch
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)  # Adam (the official fine-tuning optimiser)
    lambda_score: float = Field(0.1, ge=0)  # lambda_S: squared-hinge energy loss
    lambda_grad: float = Field(1.0, ge=0)  # lambda_gradS: masked input-gradient norm
    grad_scaling: Literal["code", "paper"] = "code"  # code: 1/n_group per gradient (greg.md §3.3.2)
    m_in: float = -11.0
    m_aux: float = -5.0
    aux_pool: int = Field(6000, gt=0)  # auxiliary outlier images (model_export/outliers.py)
    candidates: int = Field(4, ge=2)  # GReg+: candidate outliers per ID sample per step
    train_subset: int | None = Field(None, gt=0)  # ID images per epoch (None = all)


class MemoryConfig(_Strict):
    beta: float = Field(5.0, gt=0)
    memories: int = Field(10, gt=0)
    steps: int = Field(1, ge=0)
    bank: Bank = "per_class"
    sampler: Sampler = "probs"
    weights: Weights = "log"
    init: Init = "sample"
    init_norm: float = Field(10.0, gt=0)
    feature_norm: float | None = Field(None, gt=0)  # rescale features to this L2 norm; None = raw
    epochs: int = Field(50, ge=0)
    batch_size: int = Field(50, gt=0)
    lr: float = Field(1e-3, gt=0)
    top_k: int = Field(3, gt=0)
    # memory Lagrangian (reclag.py): lse = RecLag's log-sum-exp; rep_n = Dense Associative
    # Memory's rectified polynomial ReLU(h)^n (dam.md). rectified=False drops the gate from the
    # dynamics (plain MHN/DAM update); the verdict is then the score threshold alone.
    lagrangian: Lagrangian = "lse"
    power_n: int = Field(2, ge=1, le=64)
    rectified: bool = True
    # memory geometry (reclag.py): dot = a = beta xi.phi; gaussian = whitened (tied
    # within-class covariance), lifted a = -beta/2 |z - xi|^2, banks = k-means centres in the
    # whitened space (then ``epochs`` SFNN epochs with the Gaussian encoder, 0 = centres).
    geometry: Geometry = "dot"
    shrinkage: float = Field(0.0, ge=0, le=1)  # gaussian: S = (1-a) Sigma + a tr(Sigma)/D I
    radius: float | None = Field(None, gt=0)  # gaussian: shift R; None = 3 sqrt(D)
    kmeans_n_init: int = Field(1, ge=1)  # k-means restarts of init: kmeans

    @model_validator(mode="after")
    def _gaussian_is_lse(self) -> MemoryConfig:
        if self.geometry == "gaussian" and self.lagrangian != "lse":
            raise ValueError("geometry gaussian needs lagrangian lse")
        return self


class CalibrateConfig(_Strict):
    target_tpr: float = Field(0.95, gt=0, lt=1)
    quantiles: int = Field(1001, ge=11)
    # share of the hold-out replaced by its client-path copy (model_export.clientpath) before
    # the threshold and p-value table are set, so the promise holds on what clients send
    client_path: float = Field(0.0, ge=0, le=1)


class ExportConfig(_Strict):
    opset: int = Field(18, ge=17)
    parity_images: int = Field(1000, ge=1)


class BuildConfig(_Strict):
    name: str = "default"
    seed: int = 0
    workdir: Path = Path("artifacts/default")
    output: Path = Path("models/default.onnx")
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    memory: MemoryConfig = MemoryConfig()
    greg: GregConfig = GregConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    export: ExportConfig = ExportConfig()


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None, overrides: dict | None = None) -> BuildConfig:
    """Read a YAML or JSON config (None = all defaults); ``overrides`` are dotted keys."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text()
        try:
            raw = json.loads(text) if path.suffix == ".json" else (yaml.safe_load(text) or {})
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            kind = "JSON" if path.suffix == ".json" else "YAML"
            raise ConfigError(f"{path}: not valid {kind}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors())
        raise ConfigError(f"{path or 'config'}: {problems}") from None
