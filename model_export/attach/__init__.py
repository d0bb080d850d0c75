"""``hopgate-export attach``: a gate bundle for the user's own classifier (docs/attach.md).

build (the command's work), cli, config (the attach YAML), images (the user's folder and labels),
classifier (the user's model as ONNX), surgery (the graph composed around it)."""
