"""The user's classifier as an ONNX graph: read from a file, or exported from PyTorch here;
checked against the preprocessing the config states, at one opset with the gate head."""

from __future__ import annotations

import importlib
from pathlib import Path

import onnx
from onnx import version_converter

from .config import AttachError, Preprocess


def load_classifier(spec: str, pre: Preprocess, opset: int) -> onnx.ModelProto:
    """The classifier as an ONNX model: an ``.onnx`` file (external data loaded from its
    folder), a TorchScript file (``.pt``/``.pth``) or ``package.module:factory`` (a function
    returning an ``nn.Module``; both exported here with a dynamic batch axis)."""
    path = Path(spec)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise AttachError(f"{spec}: no such ONNX file")
        try:
            return onnx.load(str(path), load_external_data=True)
        except Exception as e:  # protobuf DecodeError, missing external data, ...
            raise AttachError(f"{spec}: not a readable ONNX file ({type(e).__name__}: {e})"
                              ) from None
    if path.suffix in (".pt", ".pth"):
        if not path.is_file():
            raise AttachError(f"{spec}: no such TorchScript file")
        import torch

        return _export_torch(torch.jit.load(str(path), map_location="cpu"), pre, opset, True)
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise AttachError(f"--model {spec!r}: give an .onnx file, a TorchScript .pt file or "
                          "package.module:factory")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise AttachError(f"cannot import {spec!r}: {e}") from None
    return _export_torch(factory(), pre, opset, False)


def _export_torch(module, pre: Preprocess, opset: int, scripted: bool) -> onnx.ModelProto:
    import io
    import warnings

    import torch

    module.eval()
    x = torch.zeros(pre.input_shape(2))
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
                                    dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    return program.model_proto


def to_opset(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, int]:
    """The model at one default-domain opset, max(its own, ``opset``), converted up when
    older (one graph has one opset per domain), and that opset."""
    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if have >= opset:
        return model, have
    return version_converter.convert_version(model, opset), opset


def check_input(model: onnx.ModelProto, pre: Preprocess) -> str:
    """The classifier's one image input; its static dims must match the preprocessing."""
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
    if dims[0] is not None and dims[0] != 0:
        raise AttachError(f"the classifier's input {inputs[0].name} has a fixed batch of "
                          f"{dims[0]}: export it with a dynamic batch axis")
    return inputs[0].name
