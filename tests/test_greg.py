"""GReg / GReg+ (model_export/greg.py): the loss terms, the energy-based sampling, the outlier
pool's disjointness from the test OOD sets, and a real GReg bundle served by the service."""

from __future__ import annotations

import hashlib
import io
import math
import string

import numpy as np
import pytest
import torch
from PIL import Image

from hopgate.bundle import load_meta
from hopgate.model_export import backbones
from hopgate.model_export.config import GregConfig
from hopgate.model_export.data import outliers
from hopgate.model_export.data import sources as data
from hopgate.model_export.greg import free_energy, greg_loss, select_outliers
from hopgate.model_export.model import Normalize


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return backbones.build("small_resnet", 10, 1).eval(), Normalize([0.5], [0.5])


def _batch(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28, 1), generator=g, dtype=torch.uint8)


def test_code_scaling_is_the_paper_term_over_the_group_size(net):
    """greg.md §3.3.2: the official batch-mean scalar gives each row 1/n_group; in eval mode
    (no BatchNorm coupling) code = paper / (2 n) for equal groups of n."""
    model, norm = net
    x_in, x_aux, y = norm(_batch(1, 6)), norm(_batch(2, 6)), torch.arange(6) % 10
    s = free_energy(model(torch.cat([x_in, x_aux]))[1])
    g = GregConfig(m_in=float(s.max()) + 1, m_aux=float(s.min()) - 1, lambda_score=0,
                   lambda_grad=1)  # every sample counts as detected: both masks full
    _, code = greg_loss(model, x_in, y, x_aux, g.model_copy(update={"grad_scaling": "code"}))
    _, paper = greg_loss(model, x_in, y, x_aux, g.model_copy(update={"grad_scaling": "paper"}))
    assert code["in_mask"] == 1 and code["aux_mask"] == 1
    assert paper["grad"] > 0
    assert code["grad"] == pytest.approx(paper["grad"] / 12, rel=1e-4)


def test_masked_terms_vanish_when_nothing_is_detected(net):
    model, norm = net
    x_in, x_aux, y = norm(_batch(3, 5)), norm(_batch(4, 5)), torch.arange(5)
    for scaling in ("code", "paper"):
        g = GregConfig(m_in=-1e6, m_aux=1e6, grad_scaling=scaling)
        loss, parts = greg_loss(model, x_in, y, x_aux, g)
        assert parts["grad"] == 0 and parts["in_mask"] == 0 and parts["aux_mask"] == 0
        assert parts["score"] > 0  # the hinge works on mis-detected samples instead
        loss.backward()  # and the loss is still differentiable


def test_energy_sampling_takes_each_clusters_extremes(net):
    import torch.nn.functional as F
    from sklearn.cluster import KMeans

    model, norm = net
    cand = _batch(5, 48).numpy()
    idx = select_outliers(model, norm, cand, k=8, seed=3)
    assert len(idx) == 16 and len(set(idx.tolist())) == 16
    with torch.no_grad():
        phi, logits = model(norm(torch.from_numpy(cand)))
    s = free_energy(logits).numpy()
    lab = KMeans(8, n_init=3, random_state=3).fit(F.normalize(phi, dim=1).numpy()).labels_
    for j in range(8):
        members = np.flatnonzero(lab == j)
        assert members[np.argmin(s[members])] in idx
        assert members[np.argmax(s[members])] in idx


def _digests(images):
    return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def test_auxiliary_outliers_are_disjoint_from_every_test_ood_set():
    pool = outliers.auxiliary_outliers(300, (28, 28), 1, seed=0)
    assert pool["images"].shape == (300, 28, 28, 1) and pool["images"].dtype == np.uint8
    test = data.far_ood_sets((28, 28), 1, seed=0)
    assert not (_digests(pool["images"]) & set().union(*(_digests(v) for v in test.values())))
    used = {"skimage." + n for n in ("astronaut", "coffee", "chelsea", "cat", "rocket",
                                     "motorcycle_left", "stereo_motorcycle", "camera", "coins",
                                     "moon", "page", "text", "grass", "gravel", "brick",
                                     "rough_wall", "cell", "colorwheel", "hubble_deep_field",
                                     "immunohistochemistry", "lfw_subset")}
    assert not used & set(pool["sources"])
    assert any(s.startswith("skimage.") or s.startswith("matplotlib.") for s in pool["sources"])
    assert not set(outliers.SYMBOLS) & set(string.ascii_letters + string.digits)


# --- a real GReg bundle: the quick build's backbone fine-tuned, then the usual steps --------

@pytest.fixture(scope="module")
def greg_bundle(quick_build, tmp_path_factory):
    from hopgate.model_export import pipeline
    from hopgate.model_export.config import load_config

    qcfg, _ = quick_build
    work = tmp_path_factory.mktemp("greg")
    raw = qcfg.model_dump(mode="json")
    raw.update(name="greg_test", workdir=str(work), output=str(work / "greg.onnx"))
    raw["backbone"]["method"] = "greg"
    raw["greg"] = {"init": str(qcfg.workdir / "backbone.pt"), "train_subset": 96,
                   "batch_size": 16, "aux_pool": 200, "lr": 1e-4}
    raw["memory"]["epochs"] = 2
    cfg = load_config(None, raw)
    report = pipeline.build(cfg, progress=False)
    return cfg, report


@pytest.mark.slow
@pytest.mark.integration
def test_greg_bundle_is_served_unchanged(greg_bundle, tmp_path):
    import httpx

    from hopgate.model_export.export import ort_session, run_ort
    from hopgate.service.server.local import local_server

    cfg, report = greg_bundle
    losses = report["train"]["train_loss"]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert report["train"]["test_accuracy"] > 0.6  # fine-tuning kept the classifier
    meta = load_meta(cfg.output)
    assert meta.backbone.endswith("+greg") and meta.lagrangian == "lse"
    shirt = data.fashion_mnist("test").images[:1]
    direct = run_ort(ort_session(cfg.output), shirt)
    with (local_server(tmp_path, cfg.output, intra_op_threads=1) as srv,
          httpx.Client(base_url=srv.url, timeout=30) as c):
            buf = io.BytesIO()
            Image.fromarray(shirt[0, ..., 0]).save(buf, "PNG")
            r = c.post("/score", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["score"] == pytest.approx(float(direct["score"][0]), rel=1e-4, abs=1e-3)
    assert res["ood"] == bool(direct["is_ood"][0])
    assert res["threshold"] == pytest.approx(meta.threshold, rel=1e-6)
