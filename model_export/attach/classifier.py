"""The user's classifier as an ONNX graph: read from a file, or exported from PyTorch here;
checked against the preprocessing the config states, at one opset with the gate head."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from .config import AttachError, Preprocess


def load_classifier(spec: str, pre: Preprocess, opset: int):
    """(the classifier as an ONNX model, the PyTorch module or None): an ``.onnx`` file
    (external data loaded from its folder), a TorchScript file (``.pt``/``.pth``) or
    ``package.module:factory`` (a function returning an ``nn.Module``; both exported here with
    a dynamic batch axis at ``preprocess.size``, and kept: the guard tries other sizes on
    them). Every failure is one AttachError line."""
    path = Path(spec)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise AttachError(f"{spec}: no such ONNX file")
        try:
            return onnx.load(str(path), load_external_data=True), None
        except Exception as e:  # protobuf DecodeError, missing external data, ...
            raise AttachError(f"{spec}: not a readable ONNX file ({_first_line(e)})") from None
    if path.suffix in (".pt", ".pth"):
        if not path.is_file():
            raise AttachError(f"{spec}: no such TorchScript file")
        import torch

        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise AttachError(f"{spec}: not a readable TorchScript file ({_first_line(e)}); "
                              "save it with torch.jit.script(model).save(path)") from None
        return _export_torch(module, pre, opset, True, spec), module
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise AttachError(f"--model {spec!r}: give an .onnx file, a TorchScript .pt file or "
                          "package.module:factory")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise AttachError(f"cannot import {spec!r}: {e}") from None
    try:
        module = factory()
    except Exception as e:
        raise AttachError(f"{spec}() failed: {_first_line(e)}") from None
    return _export_torch(module, pre, opset, False, spec), module


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def run_module(module, x):
    """The module's logits on a numpy batch (its first output when it returns several)."""
    import torch

    with torch.no_grad():
        out = module(torch.from_numpy(x))
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.float().numpy()


def _export_torch(module, pre: Preprocess, opset: int, scripted: bool, spec: str
                  ) -> onnx.ModelProto:
    import io
    import warnings

    import numpy as np
    import torch

    module.eval()
    shape = pre.input_shape(2)
    try:  # the input size and channels checked first, in one line (not a 40-line trace)
        run_module(module, np.zeros(shape, np.float32))
    except Exception as e:
        raise AttachError(f"{spec} fails on a {list(shape)} input ({_first_line(e)}): fix "
                          "preprocess.size, channels or layout") from None
    x = torch.zeros(shape)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if scripted:  # TorchScript goes through the TorchScript exporter
                buf = io.BytesIO()
                torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
                return onnx.load_from_string(buf.getvalue())
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset,
                                        input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), optimize=True,
                                        verbose=False)
    except Exception as e:
        raise AttachError(f"{spec}: torch.onnx.export failed ({_first_line(e)}): export it "
                          "to ONNX yourself and attach the .onnx file") from None
    return program.model_proto


def to_opset(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, int]:
    """The model at one default-domain opset, max(its own, ``opset``), converted up when
    older (one graph has one opset per domain), and that opset."""
    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if have >= opset:
        return model, have
    return version_converter.convert_version(model, opset), opset


def check_input(model: onnx.ModelProto, pre: Preprocess) -> str:
    """The classifier's one image input; its static dims must match the preprocessing, a
    uint8 input takes no scaling or mean/std, and a fixed batch is made dynamic
    (``dynamic_batch``) or refused."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise AttachError(f"the classifier has {len(inputs)} inputs "
                          f"({[i.name for i in inputs]}); attach needs one image input")
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim]
    want = list(pre.input_shape(0)[1:])
    if len(dims) != 4 or any(d is not None and d != w for d, w in zip(dims[1:], want)):
        shown = ", ".join("?" if d is None else str(d) for d in dims)
        raise AttachError(f"the classifier's input {inputs[0].name!r} is [{shown}]; the "
                          f"preprocessing gives [batch, {', '.join(map(str, want))}] "
                          f"({pre.layout}): fix preprocess.size, channels or layout")
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in FLOATS + (TensorProto.UINT8,):
        raise AttachError(f"the classifier's input {inputs[0].name!r} is "
                          f"{TensorProto.DataType.Name(elem)}; attach feeds float or uint8")
    plain = pre.scale == 1 and all(m == 0 for m in pre.mean) and all(s == 1 for s in pre.std)
    if elem == TensorProto.UINT8 and not plain:
        raise AttachError(f"the classifier's input {inputs[0].name!r} is uint8 (it scales and "
                          "normalises inside its graph): set preprocess.in_graph: true")
    if dims[0] is not None and dims[0] != 0:
        dynamic_batch(model, inputs[0].name, dims[0], want)
    return inputs[0].name


FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)


def input_dtype(model: onnx.ModelProto, name: str) -> np.dtype:
    elem = next(i for i in model.graph.input if i.name == name).type.tensor_type.elem_type
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def dynamic_batch(model: onnx.ModelProto, name: str, fixed: int, tail: list[int]) -> None:
    """A classifier exported with a fixed batch made to take any batch, in place: the input's
    batch dim made symbolic, and every Reshape to a constant shape whose inferred output has
    that batch reshaped to -1 instead. Then checked: a batch of 3 must give what 3 single runs
    of the original give; else refused (its graph bakes the batch in elsewhere)."""
    import onnxruntime as ort

    original = model.SerializeToString()
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                       for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    consts = ({i.name for i in model.graph.initializer}
              | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output})
    for k, node in enumerate(model.graph.node):
        out = shapes.get(node.output[0])
        if (node.op_type == "Reshape" and node.input[1] in consts and out
                and None not in out and out[0] == fixed):
            new = f"hopgate/batch_shape_{k}"
            model.graph.initializer.append(numpy_helper.from_array(
                np.asarray([-1, *out[1:]], np.int64), new))
            node.input[1] = new
    for v in [*model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if v.name == name or (len(dims) and dims[0].dim_value == fixed):
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    fix = (f"the classifier's input {name!r} has a fixed batch of {fixed} and its graph "
           "does not take another batch")
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        one = ort.InferenceSession(original, opts, providers=["CPUExecutionProvider"])
        i = sess.get_inputs()[0]
        x = np.random.default_rng(0).uniform(0, 255, [3 * fixed, *tail]).astype(
            input_dtype(model, name))
        got = sess.run(None, {i.name: x})
        want = [one.run(None, {i.name: x[j:j + fixed]}) for j in range(0, len(x), fixed)]
        for o, g in enumerate(got):
            w = np.concatenate([r[o] for r in want])
            if g.shape != w.shape or not np.allclose(g, w, rtol=1e-4, atol=1e-4):
                raise AttachError(fix + f" (output {o} differs): export it with a dynamic "
                                  "batch axis")
    except AttachError:
        raise
    except Exception as e:
        raise AttachError(f"{fix} ({_first_line(e)}): export it with a dynamic batch axis"
                          ) from None
