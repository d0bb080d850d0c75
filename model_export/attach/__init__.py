"""``hopgate-export attach``: a gate bundle for the user's own classifier (docs/attach.md).

build (the command's work), cli, config (the attach YAML), images (the user's folder and labels),
classifier (the user's model as ONNX), surgery (the graph composed around it), guard (the
classifier checked against the folder before fitting), report (the figures of the bundle)."""
