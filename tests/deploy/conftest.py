from pathlib import Path

DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "default.onnx"
