"""Dense Associative Memory energies (reclag.py, lagrangian rep_n): the math, the exported graph,
and a real DAM bundle served by the unchanged service."""

from __future__ import annotations

import io
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hopgate.bundle import load_meta
from hopgate.model_export.export import check_parity, export_onnx, ort_session, run_ort
from hopgate.model_export.model import GatedModel, Normalize
from hopgate.model_export.reclag import RecLagHead, activations, run_dynamics, safe_threshold
from tests.test_graph import C, D, M, PixelFeatures, meta_for

N_POWERS = (2, 5, 30)


def _overlaps(seed, b=64):
    g = torch.Generator().manual_seed(seed)
    xi = torch.randn(b, M, D, generator=g, dtype=torch.float64)
    v = torch.randn(b, D, generator=g, dtype=torch.float64)
    return xi, v


@pytest.mark.parametrize("n", N_POWERS)
def test_rep_n_score_is_log_sum_of_rectified_powers(n):
    xi, v = _overlaps(n)
    h = torch.bmm(xi, v[:, :, None]).squeeze(-1)
    want = torch.log((torch.relu(h) ** n).sum(-1))
    score, *_ = run_dynamics(xi, v, 5.0, torch.tensor(-1e4, dtype=torch.float64), 0,
                             lagrangian="rep_n", power_n=n)
    some = (h > 1e-3).any(-1)  # rows with a positive overlap: the exact value
    assert some.sum() > len(h) // 2
    assert torch.allclose(score[some], want[some], rtol=1e-9, atol=1e-9)
    # rows with every overlap <= 0 sit at the floor log M - 30 n, finite (no -inf in the graph)
    floor = math.log(M) - 30 * n
    assert torch.all(score[~some] <= floor + 1e-6) and torch.isfinite(score).all()


@pytest.mark.parametrize("n", N_POWERS)
def test_rep_n_update_is_the_normalised_dam_activation(n):
    xi, v = _overlaps(10 + n)
    h = torch.bmm(xi, v[:, :, None]).squeeze(-1)
    w = torch.relu(h) ** (n - 1)
    want = torch.bmm((w / w.sum(-1, keepdim=True))[:, None], xi).squeeze(1)
    tau = torch.tensor(-1e4, dtype=torch.float64)  # gate open everywhere
    _, v1, _, still_open = run_dynamics(xi, v, 5.0, tau, 1, lagrangian="rep_n", power_n=n)
    assert still_open.all()
    some = (h > 1e-3).any(-1)
    assert torch.allclose(v1[some], want[some], rtol=1e-8, atol=1e-10)


def test_rep_n_origin_attracts_and_the_unrectified_update_does_not_go_there():
    xi, v = _overlaps(3)
    a = activations(xi, v, 5.0, lagrangian="rep_n", power_n=4)
    s = torch.logsumexp(a, -1)
    tau = safe_threshold(float(s.median()), M).double()
    closed = s < tau
    assert 0 < int(closed.sum()) < len(s)
    _, v_r, _, open_r = run_dynamics(xi, v, 5.0, tau, 3, lagrangian="rep_n", power_n=4)
    assert torch.all(v_r[closed] == 0) and not open_r[closed].any()
    _, v_u, _, open_u = run_dynamics(xi, v, 5.0, tau, 3, lagrangian="rep_n", power_n=4,
                                     rectified=False)
    assert torch.all(v_u[closed].norm(dim=-1) > 0)  # no origin attractor without the gate
    assert torch.equal(open_u.bool(), ~closed)  # verdict = the score threshold


def test_higher_power_retrieves_more_sharply():
    xi, v = _overlaps(4)
    h = torch.bmm(xi, v[:, :, None]).squeeze(-1)
    keep = (torch.relu(h) > 0).sum(-1) >= 2
    ent = []
    for n in (2, 30):
        p = torch.softmax(activations(xi, v, 5.0, lagrangian="rep_n", power_n=n) * (n - 1) / n, -1)
        ent.append(-(p * p.clamp_min(1e-30).log()).sum(-1)[keep].mean())
    assert ent[1] < 0.5 * ent[0]


@pytest.mark.parametrize("n,rectified", [(2, True), (30, True), (5, False)])
def test_rep_n_graph_matches_torch(tmp_path, n, rectified):
    g = torch.Generator().manual_seed(n)
    banks = torch.randn(C, M, D, generator=g)
    head = RecLagHead(banks, beta=5.0, steps=2, top_k=3, lagrangian="rep_n", power_n=n,
                      rectified=rectified)
    model = GatedModel(Normalize([0.5], [0.1]), PixelFeatures(n), head).eval()
    images = torch.randint(0, 256, (300, 1, D, 1), generator=g, dtype=torch.uint8).numpy()
    with torch.no_grad():
        s = head.score(*model.features(torch.from_numpy(images))).sort().values
    tau = float(s[149] + s[150]) / 2
    meta = meta_for(tau, 2, 5.0, method="dam", lagrangian="rep_n", power_n=n)
    path = export_onnx(model, meta, tmp_path / "dam.onnx")
    report = check_parity(model, path, images, tau)
    assert report["images"] == 300
    got = run_ort(ort_session(path), images)
    assert 0 < got["is_ood"].sum() < len(images)
    assert load_meta(path).lagrangian == "rep_n" and load_meta(path).power_n == n


# --- a real DAM bundle, built from the quick build's backbone and served -------------------

@pytest.fixture(scope="module")
def dam_bundle(quick_build, tmp_path_factory):
    from hopgate.model_export import pipeline
    from hopgate.model_export.config import load_config

    qcfg, _ = quick_build
    work = tmp_path_factory.mktemp("dam")
    shutil.copy(qcfg.workdir / "backbone.pt", work / "backbone.pt")
    cfg = load_config(None, {**qcfg.model_dump(mode="json"), "name": "dam_test",
                             "workdir": str(work), "output": str(work / "dam.onnx")})
    cfg = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={
        "lagrangian": "rep_n", "power_n": 10, "epochs": 2, "geometry": "dot",
        "feature_norm": 10.0, "beta": 5.0})})  # DAM is a dot-geometry Lagrangian
    for step in ("fit", "calibrate", "export"):
        pipeline.STEPS[step](cfg, progress=False)
    return cfg


@pytest.mark.slow
@pytest.mark.integration
def test_dam_bundle_is_served_unchanged(dam_bundle, tmp_path):
    import httpx

    from hopgate.model_export.data import sources as data
    from hopgate.service.server.local import local_server

    cfg = dam_bundle
    meta = load_meta(cfg.output)
    assert (meta.method, meta.lagrangian, meta.power_n) == ("dam", "rep_n", 10)
    shirt = data.fashion_mnist("test").images[:1]
    digit = data.resize_all(data.ood_digits()[:1], (28, 28), 1)
    direct = run_ort(ort_session(cfg.output), np.concatenate([shirt, digit]))
    with (local_server(tmp_path, cfg.output, intra_op_threads=1) as srv,
          httpx.Client(base_url=srv.url, timeout=30) as c):
            for i, img in enumerate((shirt[0], digit[0])):
                buf = io.BytesIO()
                Image.fromarray(img[..., 0]).save(buf, "PNG")
                r = c.post("/score", content=buf.getvalue(), headers={"content-type": "image/png"})
                assert r.status_code == 200, r.text
                res = r.json()["results"][0]
                assert math.isclose(res["score"], float(direct["score"][i]), rel_tol=1e-4,
                                    abs_tol=1e-3)
                assert res["ood"] == bool(direct["is_ood"][i])
                assert res["threshold"] == pytest.approx(meta.threshold, rel=1e-6)
