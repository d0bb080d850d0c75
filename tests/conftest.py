"""Shared fixtures: a quick real bundle, built once per test session from Fashion-MNIST."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "models" / "default.onnx"
BUILDS = ("quick_build",)  # fixtures that build a model: a test using one must be marked slow


@pytest.fixture(autouse=True)
def root_logging_restored():
    """``hopgate-serve``'s main, called in process (tests/service/test_preflight.py), points the
    root logger at the test's captured stdout; once pytest closes that stream, any later log
    record (torch.onnx's, say) prints a "Logging error" into another test's stderr. So every
    test leaves the root logger as it found it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def quick_build(tmp_path_factory):
    """A real (small) build: configs/quick.yaml -> train, fit, calibrate, export, parity.

    Returns (BuildConfig, build report). About a minute on two idle cores, most of it the two
    training epochs; measured 2-3 minutes while other jobs shared the cores, and 875 s on a
    heavily loaded machine. So every test that uses it is marked ``slow`` and stays out of the
    fast tier, and a slow run needs the 900 s per-test timeout of pyproject.toml.
    """
    from hopgate.model_export import pipeline
    from hopgate.model_export.config import load_config

    work = tmp_path_factory.mktemp("quick")
    cfg = load_config(ROOT / "configs" / "quick.yaml",
                      {"workdir": str(work), "output": str(work / "quick.onnx")})
    report = pipeline.build(cfg, progress=False)
    return cfg, report


def pytest_collection_modifyitems(config, items):
    """A test that needs a build but is not marked slow would drag a build into the fast tier:
    refuse to run such a test suite."""
    unmarked = [item.nodeid for item in items
                if any(f in getattr(item, "fixturenames", ()) for f in BUILDS)
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that use a model build must be marked @pytest.mark.slow: "
                                + ", ".join(unmarked))
