"""Config -> objects is written once (model_export/recipe.py) and carries every setting; the
data of a command is loaded once (splits.Sets). Fast tier: no build, no training."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from hopgate.model_export import recipe
from hopgate.model_export.config import MemoryConfig, load_config
from hopgate.model_export.data import splits
from hopgate.model_export.fit import FitConfig

ROOT = Path(__file__).resolve().parents[1]


def test_fit_config_fields_are_memory_configs_fields_with_their_types():
    hints = typing.get_type_hints(FitConfig)
    shared = [f.name for f in dataclasses.fields(FitConfig) if f.name in MemoryConfig.model_fields]
    assert set(shared) >= {"beta", "memories", "sampler", "weights", "init", "lagrangian",
                           "power_n", "epochs", "lr", "batch_size", "init_norm"}
    for name in shared:
        assert hints[name] == MemoryConfig.model_fields[name].annotation, name
        assert getattr(FitConfig(), name) == MemoryConfig.model_fields[name].default, name


def test_fit_settings_carry_every_memory_setting():
    m = MemoryConfig(lagrangian="rep_n", power_n=10, init="kmeans", sampler="probs_as_logits",
                     weights="tf", beta=2.0, memories=7, epochs=3, lr=0.01, batch_size=20,
                     init_norm=4.0)
    f = recipe.fit_settings(m)
    for field in dataclasses.fields(f):
        if field.name in MemoryConfig.model_fields:
            assert getattr(f, field.name) == getattr(m, field.name), field.name


def test_head_carries_every_memory_setting():
    m = MemoryConfig(top_k=2, lagrangian="rep_n", power_n=10, rectified=False, steps=3,
                     beta=2.0, feature_norm=5.0, bank="shared")
    head = recipe.make_head(m, torch.randn(1, 4, 8), torch.zeros(1, 4))
    assert (head.top_k, head.lagrangian, head.power_n, head.rectified, head.steps, head.beta,
            head.feature_norm, head.shared) == (2, "rep_n", 10, False, 3, 2.0, 5.0, True)


def _calls(path: Path, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in names]


def test_config_to_objects_is_written_once():
    """RecLagHead(...) and FitConfig(...) are built from a config only in recipe.py."""
    files = sorted((ROOT / "model_export").glob("*.py")) + [ROOT / "benchmarks/robustness/run.py"]
    hits = [h for p in files if p.name != "recipe.py"
            for h in _calls(p, {"RecLagHead", "FitConfig", "BundleMeta"})]
    assert not hits, "config -> object mappings outside recipe.py:\n" + "\n".join(hits)


@pytest.fixture()
def tiny_config(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        np.savez(tmp_path / f"{split}.npz", images=rng.integers(0, 256, (n, 8, 8), np.uint8),
                 labels=np.arange(n) % 2)
    return load_config(None, {"data": {"id": f"npz:{tmp_path}/train.npz",
                                       "test": f"npz:{tmp_path}/test.npz", "size": [8, 8]},
                              "workdir": str(tmp_path / "work")})


def test_sets_load_each_source_once(tiny_config, monkeypatch):
    calls = []
    real = splits._load
    monkeypatch.setattr(splits, "_load", lambda *a: calls.append(a[:2]) or real(*a))
    sets = splits.Sets(tiny_config)
    for _ in range(3):  # every step asks again
        assert len(sets.train) + len(sets.holdout) == 40
        assert len(sets.test) == 10
    assert sorted(c[1] for c in calls) == ["test", "train"]
    a, b = splits.id_splits(tiny_config)
    np.testing.assert_array_equal(a.images, sets.train.images)  # the same split as before
    np.testing.assert_array_equal(b.images, sets.holdout.images)
