"""hopgate's model side: backbones, RecLag memories, calibration, ONNX export (needs torch)."""

from service import __version__

__all__ = ["__version__"]
