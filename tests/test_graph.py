"""The same theory on the exported ONNX graph, run by onnxruntime, plus bundle refusals.

A tiny model whose 'backbone' passes pixels through as features (phi = normalised pixels) puts
random interaction matrices straight into the graph, so the checks are about the exported
dynamics, not about a trained network.
"""

import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hopgate.bundle import BundleError, BundleMeta, load_meta
from hopgate.model_export import reclag
from hopgate.model_export.export import ParityError, check_parity, export_onnx, ort_session, run_ort
from hopgate.model_export.model import GatedModel, Normalize
from hopgate.model_export.reclag import RecLagHead

D, C, M = 16, 4, 6


class PixelFeatures(nn.Module):
    """phi = the normalised pixel row; logits from a fixed random projection."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(D, C, generator=g))

    def forward(self, x):
        phi = x.flatten(1)
        return phi, phi @ self.w


def meta_for(threshold, steps, beta, **kw):
    return BundleMeta(
        hopgate_version="test", model_version="t", height=1, width=D, channels=1,
        mean=[0.5], std=[0.1], class_names=[f"c{i}" for i in range(C)], backbone="pixels",
        beta=beta, memories_per_class=M, steps=steps, top_k=3, threshold=threshold,
        target_tpr=0.95, score_quantiles=[0.0, 1.0], calibration_size=2,
        data_fingerprint="none", created="now", **kw)


def make(seed, steps=2, beta=0.7, threshold=None, shared=False):
    g = torch.Generator().manual_seed(seed)
    banks = torch.randn(1 if shared else C, M, D, generator=g)
    head = RecLagHead(banks, beta=beta, steps=steps, top_k=3, shared=shared)
    model = GatedModel(Normalize([0.5], [0.1]), PixelFeatures(seed), head).eval()
    images = torch.randint(0, 256, (400, 1, D, 1), generator=g, dtype=torch.uint8).numpy()
    if threshold is None:  # put the threshold inside the score distribution: both verdicts occur
        with torch.no_grad():
            phi, logits = model.features(torch.from_numpy(images))
            s = head.score(phi, logits).sort().values  # between two scores, never on one
            threshold = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    return model, images, meta_for(threshold, steps, beta, bank="shared" if shared else "per_class")


@pytest.fixture(scope="module", params=[(0, 0, False), (1, 1, False), (2, 3, False), (3, 2, True)],
                ids=["T0", "T1", "T3", "T2-shared"])
def exported(request, tmp_path_factory):
    seed, steps, shared = request.param
    model, images, meta = make(seed, steps=steps, shared=shared)
    path = export_onnx(model, meta, tmp_path_factory.mktemp("g") / "m.onnx")
    return model, images, meta, path


def test_graph_matches_torch_and_theory(exported):
    model, images, meta, path = exported
    report = check_parity(model, path, images, meta.threshold)
    assert report["images"] == len(images)
    out = run_ort(ort_session(path), images)
    ood = out["is_ood"]
    assert ood.any() and (~ood).any()
    # memory indices are -1 exactly for OOD rows
    assert (out["memory_index"][ood] == -1).all() and (out["memory_index"][~ood] >= 0).all()
    # one verdict: the flag is the score (the deciding quantity) below the threshold
    np.testing.assert_array_equal(ood, out["score"] < np.float32(meta.threshold))
    # a closed gate at t = 0 ends at the origin: OOD, energy -tau/beta
    with torch.no_grad():
        phi, logits = model.features(torch.from_numpy(images))
        bank = model.head.select(logits.argmax(-1))
        s0 = reclag.lse(reclag.activations(model.head.banks[bank], phi, meta.beta,
                                           model.head.bias[bank])).numpy()
    closed0 = s0 < meta.threshold
    assert closed0.any() and ood[closed0].all()
    if meta.steps > 0:
        np.testing.assert_allclose(out["energy"][closed0], -meta.threshold / meta.beta, rtol=1e-5)


def test_graph_open_rows_follow_the_vanilla_update(exported):
    """Where the gate is open the graph runs the vanilla MHN update: recompute it in numpy."""
    model, images, meta, path = exported
    out = run_ort(ort_session(path), images)
    banks = model.head.banks.numpy()
    x = (images.reshape(len(images), -1) / 255.0 - 0.5) / 0.1
    bank = np.zeros(len(x), int) if meta.bank == "shared" else out["pred_class"]
    v = x.astype(np.float64)
    for _ in range(meta.steps):
        a = meta.beta * np.einsum("bmd,bd->bm", banks[bank], v)
        p = np.exp(a - a.max(1, keepdims=True))
        v = np.einsum("bm,bmd->bd", p / p.sum(1, keepdims=True), banks[bank])
    a = meta.beta * np.einsum("bmd,bd->bm", banks[bank], v)
    open_ = ~out["is_ood"]
    want = bank[open_] * M + a[open_].argmax(1)
    np.testing.assert_array_equal(out["memory_index"][open_, 0], want)


def test_origin_attracts_in_the_graph(tmp_path):
    """Random matrices, lambda > M: an input at the feature origin (pixel = mean) is OOD."""
    for seed in range(3):
        model, _, meta = make(seed, steps=2, threshold=math.log(M) + 0.5)
        path = export_onnx(model, meta, tmp_path / f"o{seed}.onnx")
        origin = np.full((2, 1, D, 1), 128, np.uint8)  # (128/255 - 0.5)/0.1 ~ 0.02: near 0
        out = run_ort(ort_session(path), origin)
        assert out["is_ood"].all() and (out["memory_index"] == -1).all()


def test_log_lambda_overrides_the_threshold(exported):
    model, images, meta, path = exported
    sess = ort_session(path)
    low = run_ort(sess, images, log_lambda=math.log(M) + 1e-2)  # tiny lambda (above log M)
    high = run_ort(sess, images, log_lambda=1e6)
    assert high["is_ood"].all()
    assert low["is_ood"].sum() < run_ort(sess, images)["is_ood"].sum()


def test_parity_failure_fails(exported, tmp_path):
    model, images, meta, path = exported
    model.head.banks.mul_(1.01)  # the PyTorch side drifts from the file
    try:
        with pytest.raises(ParityError, match="parity check failed"):
            check_parity(model, path, images, meta.threshold)
    finally:
        model.head.banks.div_(1.01)


# --- refusals ----------------------------------------------------------------------------

def test_foreign_and_malformed_files_are_refused(tmp_path, exported):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not a protobuf at all" * 10)
    with pytest.raises(BundleError, match="not a readable ONNX file|no hopgate metadata"):
        load_meta(junk)
    with pytest.raises(BundleError, match="no such bundle file"):
        load_meta(tmp_path / "missing.onnx")
    # a valid ONNX model that is not a hopgate bundle
    foreign = onnx.load(str(exported[3]))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(BundleError, match="no hopgate metadata"):
        load_meta(tmp_path / "foreign.onnx")


@pytest.mark.parametrize("key,value,message", [
    ("hopgate.threshold", None, r"hopgate\.threshold: Field required"),
    ("hopgate.beta", '"hot"', r"hopgate\.beta"),
    ("hopgate.format_version", "99", r"bundle format 99 was made by hopgate"),
    ("hopgate.channels", "2", r"hopgate\.channels"),
])
def test_bad_metadata_is_named(tmp_path, exported, key, value, message):
    proto = onnx.load(str(exported[3]))
    props = {p.key: p.value for p in proto.metadata_props}
    if value is None:
        props.pop(key)
    else:
        props[key] = value
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(BundleError, match=message):
        load_meta(tmp_path / "bad.onnx")


def test_p_value_is_a_rank_among_calibration_scores():
    meta = meta_for(0.0, 1, 1.0).model_copy(
        update={"score_quantiles": [float(i) for i in range(100)], "calibration_size": 100})
    assert meta.p_value(-5) == pytest.approx(1 / 101)
    assert meta.p_value(1e9) == pytest.approx(1.0)
    assert meta.p_value(49.5) == pytest.approx((1 + 50) / 101, abs=0.02)
