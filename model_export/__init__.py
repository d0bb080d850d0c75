"""hopgate's model half: backbones, RecLag memories, calibration, ONNX export (needs torch;
imported as ``hopgate.model_export``)."""
