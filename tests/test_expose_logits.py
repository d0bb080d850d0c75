"""``model_export.export.expose_logits``: the graph-only edit that gives a bundle its optional
``logits`` output (the one-pass shape, /score?top_k). Mutations caught: exposing the ArgMax's
output, or the tensor before the classifier's last op, instead of its input; not following
a Cast back; adding the output twice."""

from __future__ import annotations

import numpy as np
import pytest


def _graph(cast: bool):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 7 - 0.5
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["z"]),
             helper.make_node("ArgMax", ["z"], ["am" if cast else "pred_class"], axis=1,
                              keepdims=0)]
    if cast:
        nodes.append(helper.make_node("Cast", ["am"], ["pred_class"], to=TensorProto.INT64))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("pred_class", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(w, "w")])
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), w


@pytest.mark.parametrize("cast", [False, True])
def test_logits_are_the_argmax_input(cast):
    import onnxruntime as ort

    from hopgate.bundle import LOGITS
    from hopgate.model_export.export import expose_logits

    model, w = _graph(cast)
    assert expose_logits(model) == "z"
    assert expose_logits(model) == LOGITS  # already there: left alone
    assert [o.name for o in model.graph.output].count(LOGITS) == 1
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    pred, z = sess.run(["pred_class", LOGITS], {"x": x})
    np.testing.assert_allclose(z, np.maximum(x, 0) @ w, rtol=1e-6)
    assert (pred == z.argmax(1)).all()


def test_no_argmax_is_one_clear_error():
    from onnx import helper

    from hopgate.model_export.export import expose_logits

    model, _ = _graph(False)
    model.graph.node[2].CopyFrom(helper.make_node("Identity", ["z"], ["pred_class"]))
    with pytest.raises(ValueError, match="no ArgMax behind pred_class"):
        expose_logits(model)
