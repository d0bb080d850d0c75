"""What ``hopgate.client`` can score, turned into the bytes it sends.

* a path (``str`` or ``os.PathLike``): the file's bytes, sent as they are (the server sniffs
  the format and decodes; nothing is decoded or re-encoded here);
* ``bytes`` / ``bytearray`` / ``memoryview``: an encoded image, sent as is;
* a Pillow image, or a uint8 numpy array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` or
  ``[H, W, 4]``: encoded losslessly as PNG (Pillow is imported only then).

A file that cannot be read raises ``OSError`` and an array of the wrong shape or type
``ValueError``: ``score_many`` turns either into that image's own error (``encode_all``).
Anything else is a ``TypeError``: a programming mistake, raised at once. The batching
helpers (``chunks``, ``by_bytes``, ``merge``) cut the inputs into requests and put the
answers back in input order.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np

from .results import LOCAL, Result

Image = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, Any]
Part = tuple[str, bytes] | Result  # an encoded image, or the Result of one that failed
T = TypeVar("T")


def encode(x: Image) -> tuple[str, bytes]:
    """``(name, encoded bytes)`` for one input; the name is the file's, else ``image.png``
    or ``image``."""
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        return p.name, p.read_bytes()
    if isinstance(x, (bytes, bytearray, memoryview)):
        return "image", bytes(x)
    if isinstance(x, np.ndarray):
        return "image.png", _png_of_array(x)
    if _is_pil(x):
        return "image.png", _png(x)
    raise TypeError(f"cannot score a {type(x).__name__}: give a path, bytes, a PIL image or a "
                    "uint8 numpy array")


def _is_pil(x: object) -> bool:
    mod = type(x).__module__
    return mod.startswith("PIL.") and hasattr(x, "save") and hasattr(x, "mode")


def _png_of_array(a: np.ndarray) -> bytes:
    if a.dtype != np.uint8:
        raise ValueError(f"array of dtype {a.dtype}: convert it to uint8 (0-255) first")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
        raise ValueError(f"array of shape {a.shape}: expected [H, W], [H, W, 1], [H, W, 3] or "
                         "[H, W, 4]")
    from PIL import Image as PILImage

    return _png(PILImage.fromarray(np.ascontiguousarray(a)))


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def encode_all(items: list[Image]) -> list[Part]:
    out: list[Part] = []
    for x in items:
        try:
            out.append(encode(x))
        except (OSError, ValueError) as e:
            out.append(Result.failed(LOCAL, "unreadable", f"{type(e).__name__}: {e}"))
    return out


def by_bytes(parts: list[tuple[str, bytes]], limit: int) -> list[list[tuple[str, bytes]]]:
    """Consecutive groups whose bytes stay under ``limit`` (an image over it goes alone)."""
    groups: list[list[tuple[str, bytes]]] = []
    size = limit + 1
    for p in parts:
        if size + len(p[1]) > limit:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += len(p[1])
    return groups


def merge(parts: list[Part], results: list[Result]) -> list[Result]:
    it = iter(results)
    return [p if isinstance(p, Result) else next(it) for p in parts]
