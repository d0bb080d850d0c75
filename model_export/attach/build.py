"""``hopgate-export attach``: a gate bundle for the user's own classifier, sharing its backbone.

    classifier (.onnx | TorchScript | module:factory) + folder:DIR of its training images
      -> logits and penultimate features found in its graph (surgery.py)
      -> the classifier checked against the folder's labels under the stated preprocessing
         and its usual alternatives, before anything is fitted (guard.py)
      -> features and logits by onnxruntime on the folder, decoded as the service decodes
      -> memories on the correctly classified training features (fit.fit_memory, the gate
         variant of configs/default.yaml), per class of the classifier
      -> threshold on the held-out split, part of it sent along the client path (calibrate)
      -> the RecLag head exported from reclag.py, composed with the preprocessing and the
         user's graph into one bundle (hopgate.bundle's contract: the service is unchanged)
      -> checks: one verdict (is_ood == score < threshold), the bundle's logits against the
         classifier's own on the same pixels, the head's scores against PyTorch

``predicted_class`` is the classifier's argmax and the labels its ``class_names``.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from hopgate.bundle import OUTPUTS
from hopgate.pixels import Resize

from ..calibrate import (
    VerdictError,
    check_floor,
    check_one_verdict,
    quantile_table,
    threshold_at_tpr,
)
from ..data.clientpath import calibration_images
from ..data.sources import Split, split_holdout
from ..export import _make_threshold_overridable, expose_logits
from ..fit import fit_memory
from ..recipe import attached_meta, fit_settings, make_head
from ..reclag import PAD, RecLagHead, prepare_features
from .classifier import check_input, input_dtype, load_classifier, to_opset
from .config import AttachConfig, AttachError, auto_shrinkage
from .guard import Guard, probe
from .images import decode_files, folder_labels, list_folder, served_parity
from .report import evaluate
from .surgery import (
    check_features,
    compose,
    expose,
    find_features,
    find_logits,
    reference,
    save,
    too_large,
)

BATCH = 32  # images per onnxruntime call: a 224 px classifier's arena stays small
LOGITS_ATOL = 1e-3  # |bundle logits - classifier logits| allowed (float32, fused kernels)


_START = [time.time()]  # the build's start, for the elapsed time on each line


def log(msg: str) -> None:
    print(f"[hopgate-export attach {time.time() - _START[0]:5.1f}s] {msg}", flush=True)


def _session(model: onnx.ModelProto | Path, tmp: Path | None = None, stem: str = "graph"):
    """An onnxruntime session of a file or an in-memory model (via ``tmp/stem.onnx`` when too
    large to pass as bytes); warnings off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        if not too_large(model):
            return ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
        assert tmp is not None
        model = save(model, tmp / f"{stem}.onnx")
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


class Extractor:
    """The classifier's own graph (features exposed) on numpy-preprocessed pixels."""

    def __init__(self, session, features: str, logits: str, cfg: AttachConfig, dtype=np.float32):
        self.sess, self.names, self.pre = session, [features, logits], cfg.preprocess
        self.input, self.dtype = session.get_inputs()[0].name, dtype

    def __call__(self, images: np.ndarray, desc: str = "", progress: bool = False,
                 batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
        phi, logits = [], []
        for i in tqdm(range(0, len(images), batch), desc=desc, disable=not progress, leave=False):
            f, z = self.sess.run(self.names, {self.input: reference(
                self.pre, images[i:i + batch], self.dtype)})
            phi.append(f)
            logits.append(z)
        f, z = np.concatenate(phi), np.concatenate(logits)
        if f.ndim != 2 or z.ndim != 2:
            raise AttachError(f"features {self.names[0]} are {list(f.shape[1:])} and logits "
                              f"{list(z.shape[1:])} per image; both must be vectors: name a "
                              "[batch, D] tensor with --features")
        return f.astype(np.float32), z.astype(np.float32)


def fit_head(cfg: AttachConfig, phi: np.ndarray, labels: np.ndarray, num_classes: int,
             progress: bool) -> RecLagHead:
    """fit.fit_memory on the classes present (a classifier of 1,000 classes shown a few),
    placed in a bank per class of the classifier; a class without training features keeps
    an all-padding bank, so an image predicted as it is OOD."""
    m = cfg.memory
    if m.geometry == "gaussian" and "shrinkage" not in m.model_fields_set:
        m = m.model_copy(update={"shrinkage": auto_shrinkage(*phi.shape)})
        log(f"memory.shrinkage unset: {m.shrinkage if m.shrinkage is not None else 'Ledoit-Wolf'}"
            f" for {phi.shape[0]} images of {phi.shape[1]}-d features (set it to choose)")
    present, compact = np.unique(labels, return_inverse=True)
    mem = fit_memory(prepare_features(torch.from_numpy(phi), m.feature_norm),
                     torch.from_numpy(compact.astype(np.int64)), len(present), fit_settings(m),
                     cfg.seed, shared=m.bank == "shared", progress=progress)
    banks, bias = mem["banks"], mem["mask_bias"]
    if m.bank != "shared":
        banks = torch.zeros(num_classes, *mem["banks"].shape[1:])
        bias = torch.full((num_classes, banks.shape[1]), PAD)
        banks[present], bias[present] = mem["banks"], mem["mask_bias"]
    return make_head(m, banks, bias, mem.get("mean"), mem.get("whitener"))


class _HeadGraph(nn.Module):
    def __init__(self, head: RecLagHead):
        super().__init__()
        self.head = head

    def forward(self, phi, logits, log_lambda):
        out = self.head(phi, logits, log_lambda)
        return tuple(out[k] for k in OUTPUTS)


def export_head(head: RecLagHead, dim: int, classes: int, tau: float,
                opset: int) -> onnx.ModelProto:
    """The head alone, (phi, logits, log_lambda) -> the bundle's outputs, from reclag.py."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = (torch.zeros(2, dim), torch.zeros(2, classes), torch.tensor(tau))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _HeadGraph(head.eval()), example, dynamo=True, opset_version=opset,
            input_names=["phi", "logits", "log_lambda"], output_names=list(OUTPUTS),
            dynamic_shapes=({0: batch}, {0: batch}, None), optimize=True, verbose=False)
    return program.model_proto  # log_lambda made optional after compose (subgraphs keep names)


def run_attach(cfg: AttachConfig, model: str, data: str, test: str | None = None,
               progress: bool = True) -> dict:
    """Build the bundle (module docstring); returns the report the command prints."""
    with tempfile.TemporaryDirectory(prefix="hopgate-attach-") as tmp:  # large graphs' files
        return _attach(cfg, model, data, test, progress, Path(tmp))


def _attach(cfg: AttachConfig, model: str, data: str, test: str | None, progress: bool,
            tmp: Path) -> dict:
    t0 = _START[0] = time.time()
    pre = cfg.preprocess
    user, module = load_classifier(model, pre, cfg.opset)
    user, opset = to_opset(user, cfg.opset)
    user_input = check_input(user, pre)
    dtype = input_dtype(user, user_input)
    logits_name, how = find_logits(user, cfg.logits)
    if cfg.features:
        check_features(user, cfg.features, logits_name)
    features = cfg.features or find_features(user, logits_name)
    found = "named in the config" if cfg.features else "input of the final Gemm/MatMul"
    log(f"logits: {logits_name} ({how}); features: {features} ({found})")
    expose(user, [features, logits_name])
    extract = Extractor(_session(user, tmp, "classifier"), features, logits_name, cfg, dtype)

    folder_names, files, folder_index = list_folder(data)
    folder = Split(decode_files(files, pre), folder_index, folder_names)
    num_classes = extract(folder.images[:2])[1].shape[1]
    index, rule = folder_labels(folder.class_names, cfg, num_classes)
    log(f"labels: {rule}")
    free = [d.dim_value == 0 for d in next(
        i for i in user.graph.input if i.name == user_input).type.tensor_type.shape.dim]
    guard = Guard(probe(extract, module, pre), pre, folder.images, folder.labels, files,
                  index, np.dtype(dtype) == np.uint8, module is not None or any(free[1:]),
                  cfg.seed, log).run() if cfg.check else {}
    if not cfg.check:
        log("check: false: the classifier is not checked against the folder (guard.py)")

    train, holdout = split_holdout(folder, cfg.holdout_fraction, cfg.seed)
    phi, logits = extract(train.images, "train features", progress)
    dim = phi.shape[1]
    names = cfg.class_names or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise AttachError(f"class_names has {len(names)} names; the classifier has "
                          f"{num_classes} logits")
    log(f"{len(folder)} images in {len(folder.class_names)} folders: {len(train)} to fit, "
        f"{len(holdout)} to calibrate; features {dim}-d, {num_classes} classes")
    pred = logits.argmax(1)
    labels = pred if index is None else index[train.labels]
    right = pred == labels
    log(f"{int(right.sum())} of {len(train)} training images correctly classified"
        + ("" if index is None else f" ({right.mean():.1%})"))
    if not right.any():
        raise AttachError("no training image is classified as its folder's class: check "
                          "labels/class_names and the preprocessing")
    m = cfg.memory
    head = fit_head(cfg, phi[right], labels[right], num_classes, progress)
    log(f"fit {m.bank} {m.geometry} banks: {m.memories} memories/class, beta {m.beta}, "
        f"{len(np.unique(labels[right]))} classes with memories")

    c = cfg.calibrate
    # the client-path copies are of the classifier's view: fitted back without a crop
    cal = calibration_images(holdout.images, c.client_path, cfg.seed,
                             Resize("stretch", pre.resize_filter))
    cal_phi, cal_logits = extract(cal, "calibration", progress)
    with torch.no_grad():
        scores = head.score(torch.from_numpy(cal_phi), torch.from_numpy(cal_logits)).numpy()
    tau = threshold_at_tpr(scores, c.target_tpr)
    check_floor(tau, head.floor())
    log(f"threshold {tau:.4f} at TPR {c.target_tpr} on {len(scores)} held-out images "
        f"({c.client_path:.0%} sent along the client path)")

    proto = compose(user, user_input, features, logits_name,
                    export_head(head, dim, num_classes, tau, opset), pre,
                    extra=[logits_name])
    _make_threshold_overridable(proto, tau)  # log_lambda optional, defaulting to tau
    meta = attached_meta(cfg, Path(model).name, names, head, tau,
                         quantile_table(scores, c.quantiles), len(scores), train.fingerprint())
    del proto.metadata_props[:]
    for k, v in meta.to_props().items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "hopgate"

    report = check_bundle(proto, head, extract, cal, cal_phi, cal_logits, holdout.images,
                          tau, cfg, tmp, "user/" + logits_name)
    del proto.graph.output[len(OUTPUTS):]  # the parity copy's extra logits output
    expose_logits(proto)  # the classifier's logits as the bundle's own (one pass: top_k)
    path = save(proto, cfg.output)
    log(served_parity(path, files, folder.images, cfg))
    report.update(evaluate(_session(path), holdout.images, tau, cfg, test, extract,
                           num_classes, log))
    report.update(features=features, logits=logits_name, labels=rule, path=str(path),
                  classifier_check=guard,
                  bytes=path.stat().st_size, threshold=tau, seconds=round(time.time() - t0, 1))
    log(f"wrote {path} ({report['bytes'] / 1e6:.1f} MB) in {report['seconds']} s")
    return report


def check_bundle(proto: onnx.ModelProto, head: RecLagHead, extract: Extractor, cal: np.ndarray,
                 cal_phi: np.ndarray, cal_logits: np.ndarray, holdout: np.ndarray, tau: float,
                 cfg: AttachConfig, tmp: Path, logits_out: str) -> dict:
    """The composed graph (its user logits exposed) against its parts: one verdict and the
    scores on the calibration images, the logits and predicted class on held-out and noise."""
    sess = _session(proto, tmp, "parity")
    names = [*OUTPUTS, logits_out]

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        parts = [sess.run(names, {"images": images[i:i + BATCH]})
                 for i in range(0, len(images), BATCH)]
        return {k: np.concatenate([p[j] for p in parts]) for j, k in enumerate(names)}

    got = run(cal)
    check_one_verdict(got["is_ood"], got["score"], tau, "calibration images")
    with torch.no_grad():
        ref = head.score(torch.from_numpy(cal_phi), torch.from_numpy(cal_logits)).numpy()
    score_diff = float(np.abs(ref - got["score"]).max())
    if score_diff > 1e-3 * (1 + float(np.abs(ref).max())):
        raise VerdictError(f"bundle scores differ from the PyTorch head by {score_diff:.3g}")
    n = cfg.parity_images
    rng = np.random.default_rng(cfg.seed)
    noise = rng.integers(0, 256, (max(n // 8, 1), *holdout.shape[1:]), dtype=np.uint8)
    images = np.concatenate([holdout[:n - len(noise)], noise])
    bundle = run(images)
    _, want = extract(images)
    diff = float(np.abs(bundle[logits_out] - want).max())
    same = float((bundle["pred_class"] == want.argmax(1)).mean())
    log(f"one verdict on {len(cal)} images; logits max |diff| {diff:.2e} against the "
        f"classifier on {len(images)} images; predicted class agrees on {same:.2%}; "
        f"score max |diff| {score_diff:.2e} against PyTorch")
    if diff > LOGITS_ATOL * (1 + float(np.abs(want).max())):
        raise AttachError(f"the bundle's logits differ from the classifier's by {diff:.3g}: "
                          "the composed graph does not compute the classifier")
    return {"logits_max_abs_diff": diff, "pred_class_agreement": same,
            "score_max_abs_diff": score_diff, "parity_images": len(images)}
