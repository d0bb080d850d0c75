"""hopgate's serving side: onnxruntime, FastAPI, no torch."""

__version__ = "0.1.0"
