"""hopgate's serving half: onnxruntime, FastAPI, no torch (imported as ``hopgate.service``)."""
