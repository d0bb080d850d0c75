"""Shared fixtures: a quick real bundle, built once per test session from Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "models" / "default.onnx"


@pytest.fixture(scope="session")
def quick_build(tmp_path_factory):
    """A real (small) build: configs/quick.yaml -> train, fit, calibrate, export, parity.

    Returns (BuildConfig, build report). About a minute on two cores.
    """
    from model_export import pipeline
    from model_export.config import load_config

    work = tmp_path_factory.mktemp("quick")
    cfg = load_config(ROOT / "configs" / "quick.yaml",
                      {"workdir": str(work), "output": str(work / "quick.onnx")})
    report = pipeline.build(cfg, progress=False)
    return cfg, report
