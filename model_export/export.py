"""ONNX export of a GatedModel, the bundle metadata, and the PyTorch <-> onnxruntime parity gate.

The graph: uint8 images [B, H, W, C] (dynamic B) and an optional scalar ``log_lambda``
(the calibrated threshold when left out, so a deployment can move the threshold without
re-export: ``_make_threshold_overridable``) -> the outputs named in hopgate/bundle.py. The T
update steps are unrolled in Python, so the graph holds no Loop op and every shape but B is
static.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from tqdm.auto import tqdm

from hopgate.bundle import INPUT_IMAGES, INPUT_LOG_LAMBDA, LOGITS, OUTPUTS, BundleMeta

from .model import GatedModel

# torch's ONNX exporter warns, on every export, that torchvision (never used here) is missing
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


class ParityError(RuntimeError):
    """PyTorch and onnxruntime disagree on the exported graph."""


def export_onnx(model: GatedModel, meta: BundleMeta, path: str | Path, opset: int = 18) -> Path:
    """Trace ``model`` and write a self-describing bundle to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.zeros((2, meta.height, meta.width, meta.channels), dtype=torch.uint8)
    tau = torch.tensor(meta.threshold, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example, tau), dynamo=True, opset_version=opset,
            input_names=[INPUT_IMAGES, INPUT_LOG_LAMBDA], output_names=list(OUTPUTS),
            dynamic_shapes=({0: batch}, None), optimize=True, verbose=False,
        )
    proto = program.model_proto
    _make_threshold_overridable(proto, meta.threshold)
    expose_logits(proto)
    del proto.metadata_props[:]
    for k, v in meta.to_props().items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "hopgate"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def expose_logits(proto: onnx.ModelProto) -> str:
    """Add the bundle's optional ``logits`` output (hopgate.bundle.LOGITS): the tensor the
    graph's ``pred_class`` ArgMax reads (through Cast/Identity), which is the classifier's
    logits in built and attached bundles alike. A graph-only edit: no weight, no score
    changes. Returns the tensor's name."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    if any(o.name == LOGITS for o in proto.graph.output):
        return LOGITS
    name = "pred_class"
    while (node := producers.get(name)) is not None and node.op_type in ("Cast", "Identity"):
        name = node.input[0]
    if node is None or node.op_type != "ArgMax":
        raise ValueError("no ArgMax behind pred_class: the graph's logits cannot be exposed")
    source = node.input[0]
    proto.graph.node.append(onnx.helper.make_node("Identity", [source], [LOGITS],
                                                  name="expose_logits"))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(
        LOGITS, onnx.TensorProto.FLOAT, ["batch", None]))
    return source


THRESHOLD_VALUE = "log_lambda_value"  # the threshold the gate reads: the input, or its default


def _make_threshold_overridable(proto: onnx.ModelProto, threshold: float) -> None:
    """Make the graph input ``log_lambda`` optional, defaulting to ``threshold``.

    The graph's nodes read ``log_lambda_value``: If(OptionalHasElement(log_lambda)) gives the
    fed value, else a Constant holding the calibrated threshold. So a request may feed its own
    threshold and a plain ``session.run`` may leave it out. Bundles used to give the default as
    an initializer that is also a graph input, which onnxruntime accepts for ONNX IR >= 4 only
    with a warning at every load ("Initializer log_lambda appears in graph inputs and will not
    be treated as constant value/weight"); IR < 4 would silence it but make the initializer a
    constant that no one can override. Idempotent, a graph-only edit (no weight changes): it
    also converts such an older bundle (``scripts/fix-bundle-threshold``)."""
    graph = proto.graph
    olds = [i for i in graph.initializer if i.name == INPUT_LOG_LAMBDA]
    for init in olds:  # the older form's default: the metadata's threshold, as float32
        graph.initializer.remove(init)
    source = next((i for i in graph.input if i.name == INPUT_LOG_LAMBDA), None)
    if source is None:
        raise ValueError(f"the graph has no '{INPUT_LOG_LAMBDA}' input")
    if source.type.HasField("optional_type"):  # done already: update the default only
        node = next(n for n in graph.node if n.output[:] == [THRESHOLD_VALUE])
        default = next(a.g for a in node.attribute if a.name == "else_branch").node[0]
        default.attribute[0].t.CopyFrom(numpy_helper.from_array(
            np.asarray(threshold, np.float32), "default"))
        return
    for n in graph.node:  # every reader of the input reads the resolved value instead
        n.input[:] = [THRESHOLD_VALUE if i == INPUT_LOG_LAMBDA else i for i in n.input]
    scalar = onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])
    source.type.CopyFrom(onnx.helper.make_optional_type_proto(scalar))
    fed = onnx.helper.make_graph(
        [onnx.helper.make_node("OptionalGetElement", [INPUT_LOG_LAMBDA], ["fed"])], "fed", [],
        [onnx.helper.make_tensor_value_info("fed", onnx.TensorProto.FLOAT, [])])
    default = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["default"], value=numpy_helper.from_array(
            np.asarray(threshold, np.float32), "default"))], "default", [],
        [onnx.helper.make_tensor_value_info("default", onnx.TensorProto.FLOAT, [])])
    graph.node.insert(0, onnx.helper.make_node(
        "OptionalHasElement", [INPUT_LOG_LAMBDA], ["log_lambda_fed"], name="log_lambda_fed"))
    graph.node.insert(1, onnx.helper.make_node(
        "If", ["log_lambda_fed"], [THRESHOLD_VALUE], name="log_lambda_or_default",
        then_branch=fed, else_branch=default))


def upgrade_threshold_input(path: str | Path) -> bool:
    """Rewrite, in place, a bundle whose ``log_lambda`` default is an initializer-input (those
    exported before issue 22) into the optional input ``_make_threshold_overridable`` makes:
    onnxruntime stops warning at each load, and no weight, score or metadata changes (the
    default is the metadata's threshold; an initializer that disagrees is refused).
    External weights stay where they are. Returns whether the file changed."""
    from hopgate.bundle import load_meta

    path = Path(path)
    meta = load_meta(path)
    proto = onnx.load(str(path), load_external_data=False)
    source = next((i for i in proto.graph.input if i.name == INPUT_LOG_LAMBDA), None)
    if source is None or source.type.HasField("optional_type"):
        return False  # no threshold input, or converted already
    init = next((i for i in proto.graph.initializer if i.name == INPUT_LOG_LAMBDA), None)
    if init is not None and numpy_helper.to_array(init) != np.float32(meta.threshold):
        raise ValueError(f"{path}: log_lambda {numpy_helper.to_array(init)} is not the "
                         f"metadata's threshold {meta.threshold}")
    _make_threshold_overridable(proto, meta.threshold)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return True


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # errors only: older bundles' overridable log_lambda initializer warns (hopgate/bundle.py)
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _batches(n: int, batch_size: int, desc: str | None) -> tqdm:
    """Batch starts, with a progress bar (time left) when ``desc`` is given."""
    return tqdm(range(0, n, batch_size), desc=desc, disable=desc is None, leave=False)


def run_ort(session, images: np.ndarray, log_lambda: float | None = None,
            batch_size: int = 256, desc: str | None = None) -> dict[str, np.ndarray]:
    """Run the bundle over uint8 images in batches; outputs concatenated by name."""
    parts: dict[str, list] = {k: [] for k in OUTPUTS}
    for i in _batches(len(images), batch_size, desc):
        feed = {INPUT_IMAGES: np.ascontiguousarray(images[i:i + batch_size])}
        if log_lambda is not None:
            feed[INPUT_LOG_LAMBDA] = np.asarray(log_lambda, dtype=np.float32)
        for k, v in zip(OUTPUTS, session.run(list(OUTPUTS), feed)):
            parts[k].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


@torch.no_grad()
def run_torch(model: GatedModel, images: np.ndarray, log_lambda: float,
              batch_size: int = 256, desc: str | None = None) -> dict[str, np.ndarray]:
    model.eval()
    parts: dict[str, list] = {k: [] for k in OUTPUTS}
    for i in _batches(len(images), batch_size, desc):
        batch = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))
        out = model.run(batch, log_lambda)
        for k in OUTPUTS:
            parts[k].append(out[k].numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def check_parity(model: GatedModel, path: str | Path, images: np.ndarray, log_lambda: float,
                 rtol: float = 1e-4, progress: bool = False) -> dict:
    """PyTorch vs onnxruntime on real images: every score within rtol*(1+|score|), identical
    is_ood, pred_class and memory_index (except rows whose score is within that tolerance of
    the threshold, counted as ``borderline``); in both runtimes is_ood == (score < threshold)
    on every image, borderline or not (one verdict); batch 1 and batch 64 must both run.

    Raises ParityError naming the first disagreement; returns a small report.
    """
    sess = ort_session(path)
    ref = run_torch(model, images, log_lambda, desc="parity: pytorch" if progress else None)
    got = run_ort(sess, images,  # the bundle's own default threshold
                  desc="parity: onnxruntime" if progress else None)
    diff = np.abs(ref["score"] - got["score"])
    tol = rtol * (1.0 + np.abs(ref["score"]))
    problems = []
    if np.any(diff > tol):
        i = int(np.argmax(diff / tol))
        problems.append(f"score of image {i}: torch {ref['score'][i]:.6f} "
                        f"vs onnx {got['score'][i]:.6f}")
    # A score within float tolerance of the threshold has no well-defined verdict: those rows
    # (counted in the report) are exempt from the flag comparison, all others must match.
    borderline = np.abs(ref["score"] - log_lambda) <= tol
    # Memories whose softmax weight underflowed to ~0 tie with each other, so their order in
    # the top-k is arbitrary; every memory with a real weight must match.
    ranked = ref["memory_weight"] > 1e-6
    for k in ("is_ood", "pred_class", "memory_index"):
        same = ref[k] == got[k]
        if k == "memory_index":
            same |= ~ranked & (got["memory_weight"] <= 1e-6)
        differs = (~same).reshape(len(images), -1).any(1)
        if k != "pred_class":
            differs &= ~borderline
        bad = np.flatnonzero(differs)
        if len(bad):
            problems.append(f"{k} differs on {len(bad)} images (first: {int(bad[0])})")
    # one verdict, exactly (no borderline exemption): in each runtime the flag is score < tau
    for name, out in (("pytorch", ref), ("onnxruntime", got)):
        bad = int((out["is_ood"] != (out["score"] < np.float32(log_lambda))).sum())
        if bad:
            problems.append(f"{name}: is_ood disagrees with score < threshold on {bad} images")
    for b in (1, 64):  # the dynamic batch axis really is dynamic
        if len(images) >= b:
            one = run_ort(sess, images[:b], batch_size=b)
            if not np.allclose(one["score"], got["score"][:b], rtol=rtol, atol=rtol):
                problems.append(f"batch {b} scores differ from the batched run")
    if problems:
        raise ParityError(f"{path}: parity check failed on {len(images)} images: "
                          + "; ".join(problems))
    return {"images": int(len(images)), "borderline": int(borderline.sum()),
            "max_score_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / (1.0 + np.abs(ref["score"]))).max())}
