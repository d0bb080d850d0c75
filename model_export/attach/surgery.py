"""ONNX graph surgery for ``attach``: find the classifier's logits and penultimate features, put
the preprocessing in front and the gate head behind, as one graph (classifier.py reads it).

    images uint8 [B, H, W, C] -> pre/ (cast, BGR flip, scale, mean/std, layout) -> user/ (their
    graph, unchanged) -> user/<features>, user/<logits> -> gate/ (the RecLag head exported
    from reclag.py) -> the bundle's outputs (hopgate.bundle)

Names: every user node and tensor gets the prefix ``user/`` and every head one ``gate/``, so
no name of theirs can collide with ours; the boundary names (``images``, ``log_lambda``, the
outputs) are then given back their bundle names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hopgate.bundle import INPUT_IMAGES, INPUT_LOG_LAMBDA, OUTPUTS

from .config import AttachError, Preprocess

LARGE_BYTES = 1_800_000_000  # above this the bundle keeps its weights as external data
_MATMUL = ("Gemm", "MatMul")
_PASS = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast")  # shape-only ops
_SCALE = ("Div", "Mul", "Sub")  # by a constant: a temperature z / T, a scale, a shift
_PROBS = ("Softmax", "LogSoftmax")


# --- finding the logits and the penultimate features -------------------------------------

def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _constants(graph: onnx.GraphProto) -> set[str]:
    return ({i.name for i in graph.initializer}
            | {o for n in graph.node if n.op_type == "Constant" for o in n.output})


def find_logits(model: onnx.ModelProto, name: str | None) -> tuple[str, str]:
    """(logits tensor, how it was found): the named output, or the graph's only output; a
    Softmax/LogSoftmax output is followed back to its input (the gate needs logits)."""
    outputs = [o.name for o in model.graph.output]
    if name is None:
        if len(outputs) != 1:
            raise AttachError(f"the classifier has outputs {outputs}: name the logits with "
                              "logits: NAME in the config")
        name = outputs[0]
    elif name not in outputs and name not in _producers(model.graph):
        raise AttachError(f"logits {name!r} is not a tensor of the classifier "
                          f"(outputs {outputs})")
    for out in outputs:  # a named ``logits`` may be another output's features
        if out != name and _walk_back(model, out)[0] == name:
            raise AttachError(f"logits {name!r} is the input of the final Gemm/MatMul of "
                              f"output {out!r}, i.e. the penultimate features: set "
                              f"logits: {out}")
    node = _producers(model.graph).get(name)
    if node is not None and node.op_type in _PROBS:
        return node.input[0], f"input of the final {node.op_type} (output {name!r})"
    return name, f"output {name!r}"


def find_features(model: onnx.ModelProto, logits: str) -> str:
    """The penultimate features: the non-constant input of the last Gemm/MatMul (+ Add) that
    makes ``logits``, looking through shape-only ops and scaling by a constant."""
    found, seen = _walk_back(model, logits)
    if found is not None:
        return found
    raise AttachError(f"no final Gemm/MatMul found behind {logits!r} (walked back through "
                      f"{' <- '.join(seen) or 'nothing'}): name the penultimate tensor with "
                      "--features")


def _walk_back(model: onnx.ModelProto, logits: str) -> tuple[str | None, list[str]]:
    """(the final Gemm/MatMul's moving input or None, the tensors from its output to
    ``logits`` or, when none was found, the op types walked through)."""
    graph = model.graph
    prod, const = _producers(graph), _constants(graph)
    name, seen, chain = logits, [], []
    for _ in range(8):
        node = prod.get(name)
        if node is None:
            break
        seen.append(node.op_type)
        chain.append(name)
        if node.op_type in _MATMUL:
            moving = [i for i in node.input[:2] if i not in const]
            if len(moving) == 1:
                return moving[0], chain
            break
        if node.op_type == "Add" or (node.op_type in _SCALE and (
                node.op_type == "Mul" or node.input[1] in const)):
            # the bias, or a temperature / scale by a constant: follow the moving side
            moving = [i for i in node.input if i not in const]
            if len(moving) != 1:
                break
            name = moving[0]
        elif node.op_type in _PASS:
            name = node.input[0]
        else:
            break
    return None, seen


def check_features(model: onnx.ModelProto, features: str, logits: str) -> None:
    """``--features`` must be a tensor before the logits: not the logits, not a tensor
    between the final Gemm/MatMul and them (a temperature), not one computed from them
    (probabilities). The features must be a tensor of the graph."""
    graph = model.graph
    if features not in _producers(graph) and features not in {i.name for i in graph.input}:
        raise AttachError(f"--features {features!r} is not a tensor of the classifier")
    found, chain = _walk_back(model, logits)
    if found is None:
        chain = [logits]
    after, todo = set(chain), list(chain)
    while todo:  # everything computed from the logits
        t = todo.pop()
        for n in graph.node:
            if t in n.input:
                new = [o for o in n.output if o not in after]
                after.update(new)
                todo += new
    if features in after:
        hint = f" ({found!r}, found by itself without --features)" if found else ""
        raise AttachError(f"--features {features!r} is the logits or computed from them: "
                          "name the penultimate tensor, the input of the final Gemm/MatMul"
                          + hint)


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Make tensors graph outputs (in place) so onnxruntime returns them."""
    have = {o.name for o in model.graph.output}
    known = {v.name: v for v in model.graph.value_info}
    for n in names:
        if n in have:
            continue
        if n in known and known[n].type.tensor_type.HasField("shape"):
            model.graph.output.append(known[n])
        else:  # features and logits are [batch, D] (the extractor checks it)
            model.graph.output.append(
                helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", None]))
    return model


# --- preprocessing and composition -----------------------------------------------------

def preprocess_graph(pre: Preprocess, opset: int, ir_version: int, out: str,
                     dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """uint8 [B, H, W, C] ``images`` -> the classifier's input (element type ``dtype``), as
    ``preprocess`` states: BGR flip, cast, (x / scale - mean) / std, NHWC -> NCHW; a uint8
    input gets the pixels as they are (the graph normalises them). ``reference`` is its
    numpy twin."""
    h, w = pre.size
    c = pre.channels
    consts = [numpy_helper.from_array(np.asarray(v, np.float32).reshape(-1), n) for n, v in
              (("pre/scale", [pre.scale]), ("pre/mean", pre.mean), ("pre/std", pre.std))]
    nodes, x = [], INPUT_IMAGES
    if pre.channel_order == "BGR" and c == 3:
        consts.append(numpy_helper.from_array(np.asarray([2, 1, 0], np.int64), "pre/bgr"))
        nodes.append(helper.make_node("Gather", [x, "pre/bgr"], ["pre/flip"], axis=3))
        x = "pre/flip"
    if dtype != TensorProto.UINT8:
        nodes += [helper.make_node("Cast", [x], ["pre/f"], to=TensorProto.FLOAT),
                  helper.make_node("Div", ["pre/f", "pre/scale"], ["pre/unit"]),
                  helper.make_node("Sub", ["pre/unit", "pre/mean"], ["pre/centred"]),
                  helper.make_node("Div", ["pre/centred", "pre/std"], ["pre/norm"])]
        x = "pre/norm"
        if dtype != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [x], ["pre/typed"], to=dtype))
            x = "pre/typed"
    if pre.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [x], ["pre/nchw"], perm=[0, 3, 1, 2]))
        x = "pre/nchw"
    nodes.append(helper.make_node("Identity", [x], [out]))
    shape = pre.input_shape(0)
    graph = helper.make_graph(
        nodes, "preprocess",
        [helper.make_tensor_value_info(INPUT_IMAGES, TensorProto.UINT8, ["batch", h, w, c])],
        [helper.make_tensor_value_info(out, dtype, ["batch", *shape[1:]])],
        consts if dtype != TensorProto.UINT8 else consts[3:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def reference(pre: Preprocess, images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The preprocessing in numpy (the graph's order of operations), as ``dtype``."""
    x = images
    if pre.channel_order == "BGR" and pre.channels == 3:
        x = x[..., ::-1]
    if np.dtype(dtype) != np.uint8:
        x = ((x.astype(np.float32) / np.float32(pre.scale) - np.asarray(pre.mean, np.float32))
             / np.asarray(pre.std, np.float32)).astype(dtype)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if pre.layout == "NCHW" else x)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename one tensor everywhere in the top-level graph."""
    for n in graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def too_large(model: onnx.ModelProto) -> bool:
    """Past what one protobuf (2 GiB) can be serialised as, with a margin."""
    return model.ByteSize() > LARGE_BYTES


def _merge(m1: onnx.ModelProto, m2: onnx.ModelProto, io_map: list[tuple[str, str]],
           outputs: list[str] | None = None) -> onnx.ModelProto:
    """onnx.compose.merge_models without its in-memory check (it serialises the model, which
    a graph over 2 GiB cannot be; ``save`` checks the file instead)."""
    graph = onnx.compose.merge_graphs(m1.graph, m2.graph, io_map, outputs=outputs)
    opsets: dict[str, int] = {}
    for o in [*m1.opset_import, *m2.opset_import]:
        opsets[o.domain] = max(o.version, opsets.get(o.domain, 0))
    model = helper.make_model(graph, ir_version=max(m1.ir_version, m2.ir_version),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.functions.extend([*m1.functions, *m2.functions])
    return model


def compose(user: onnx.ModelProto, user_input: str, features: str, logits: str,
            head: onnx.ModelProto, pre: Preprocess, extra: list[str] = ()) -> onnx.ModelProto:
    """One graph: preprocessing -> the user's graph -> the head (all at one opset), with the
    bundle's input and output names. ``extra`` user tensors (unprefixed names) are kept as
    outputs ``user/<name>`` (the parity copy exposes the logits this way). ``user`` is
    modified in place (large graphs are not copied)."""
    opset = next(o.version for o in head.opset_import if o.domain in ("", "ai.onnx"))
    expose(user, [features, logits, *extra])
    onnx.compose.add_prefix(user, "user/", inplace=True)
    onnx.compose.add_prefix(head, "gate/", inplace=True)
    elem = next(i for i in user.graph.input
                if i.name == "user/" + user_input).type.tensor_type.elem_type
    front = _merge(preprocess_graph(pre, opset, user.ir_version, "pre/x", elem), user,
                   [("pre/x", "user/" + user_input)])
    keep = [f"gate/{k}" for k in OUTPUTS] + [f"user/{e}" for e in extra]
    model = _merge(front, head, [("user/" + features, "gate/phi"),
                                 ("user/" + logits, "gate/logits")], outputs=keep)
    for k in (*OUTPUTS, INPUT_LOG_LAMBDA):
        _rename(model.graph, f"gate/{k}", k)
    order = {name: i for i, name in enumerate((*OUTPUTS, *keep))}  # the bundle's first
    outs = sorted(model.graph.output, key=lambda o: order[o.name])
    del model.graph.output[:]
    model.graph.output.extend(outs)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    """One file; a graph too large for one protobuf keeps its weights in ``<name>.data`` next
    to it (onnxruntime reads it from there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if too_large(model):
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)
        onnx.checker.check_model(str(path))
        # onnx.save moved the weights out of ``model``: read them back, it is used again
        onnx.load_external_data_for_model(model, str(path.parent))
    else:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return path
