"""The pixel policy shared by training and serving: how an image becomes the model's input.

Training (``hopgate.model_export.data``) and the service (``hopgate.service.imaging``) both
call ``fit``, so the model never sees pixels resized one way in training and another way in
production.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def fit(img: Image.Image, height: int, width: int, resize: str = "stretch") -> np.ndarray:
    """The one resize policy, shared with training (model_export.data.resize): stretch, or
    centre crop then resize, bilinear. ``img`` is already L or RGB."""
    if resize == "center_crop":
        s = min(img.width, img.height)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s))
    arr = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
