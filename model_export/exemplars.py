"""Memories you can look at: each memory's class and the training images it stands for.

The bundle itself picks them: its onnxruntime session scores a seeded sample of the training
images, and each memory keeps the correctly classified, ID-scored images retrieved to it with
the highest weight (ties: the higher score, the more typical image). The thumbnails (PNG, at
most ``THUMB_PX`` a side) go into the bundle's ``hopgate.exemplars`` metadata
(``hopgate.bundle.MemoryExemplars``); the graph and every other key are left byte for byte, so
the step also upgrades a bundle built before it existed (``hopgate-export exemplars``).

Size bound: thumbnails are added best first, round by round (every memory's best, then every
memory's second, ...) until ``max_bytes`` of base64 would be passed, so a large bank gets
fewer exemplars per memory rather than a large bundle.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from hopgate.bundle import INPUT_IMAGES, PREFIX, BundleMeta, MemoryExemplars, load_meta

KEY = PREFIX + "exemplars"
THUMB_PX = 32
PER_MEMORY = 4
MAX_BYTES = 400_000  # the default bundle (1.5 MB) stays under 2 MB
SAMPLE = 12_000  # training images scored: ~120 per memory for 100 memories
BATCH = 256


def thumbnail(image: np.ndarray, px: int = THUMB_PX) -> str:
    """uint8 [H, W, C] -> base64 PNG of at most ``px`` a side (grey stays grey)."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if max(img.size) > px:
        img.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def retrieve(path: str | Path, images: np.ndarray, labels: np.ndarray, meta: BundleMeta,
             per_memory: int = PER_MEMORY) -> tuple[list[list[int]], list[int]]:
    """Run the bundle on ``images``; per memory, the indices of its best ``per_memory`` images
    (best first) and its class (per-class banks: index // M; a shared bank: the most common
    label among the images retrieved to it, -1 if none)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n_mem = meta.memory_count
    hits: list[list[tuple[float, float, int]]] = [[] for _ in range(n_mem)]
    for start in range(0, len(images), BATCH):
        out = dict(zip(["score", "is_ood", "pred_class", "memory_index", "memory_weight"],
                       session.run(["score", "is_ood", "pred_class", "memory_index",
                                    "memory_weight"],
                                   {INPUT_IMAGES: images[start:start + BATCH]})))
        for j in range(len(out["score"])):
            i = start + j
            if out["is_ood"][j] or out["pred_class"][j] != labels[i]:
                continue  # an exemplar is a training image the gate accepts and classifies right
            for mem, w in zip(out["memory_index"][j], out["memory_weight"][j]):
                if mem >= 0 and w > 0:
                    hits[int(mem)].append((float(w), float(out["score"][j]), i))
    best = [[i for _, _, i in sorted(h, reverse=True)[:per_memory]] for h in hits]
    if meta.bank == "per_class":
        classes = [m // meta.memories_per_class for m in range(n_mem)]
    else:
        classes = [Counter(int(labels[i]) for _, _, i in h).most_common(1)[0][0] if h else -1
                   for h in hits]
    return best, classes


def exemplars(path: str | Path, images: np.ndarray, labels: np.ndarray, source: str,
              per_memory: int = PER_MEMORY, max_bytes: int = MAX_BYTES,
              px: int = THUMB_PX) -> MemoryExemplars:
    """The ``MemoryExemplars`` of the bundle at ``path`` from training ``images``/``labels``."""
    meta = load_meta(path)
    best, classes = retrieve(path, images, labels, meta, per_memory)
    thumbs: list[list[str]] = [[] for _ in best]
    used = 0
    for rank in range(per_memory):  # round by round, so the budget cuts depth, not memories
        for mem, picks in enumerate(best):
            if rank < len(picks):
                t = thumbnail(images[picks[rank]], px)
                if used + len(t) > max_bytes:
                    return _made(source, px, classes, thumbs)
                thumbs[mem].append(t)
                used += len(t)
    return _made(source, px, classes, thumbs)


def _made(source: str, px: int, classes: list[int], thumbs: list[list[str]]) -> MemoryExemplars:
    return MemoryExemplars(source=source, size=[px, px], classes=classes, images=thumbs)


def write(path: str | Path, found: MemoryExemplars) -> int:
    """Put ``found`` into the bundle's metadata in place (replacing earlier exemplars); the
    graph and the other keys stay as they are. Returns the bundle's new size in bytes."""
    path = Path(path)
    proto = onnx.load(str(path))
    props = [p for p in proto.metadata_props if p.key != KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    proto.metadata_props.add(key=KEY, value=found.model_dump_json())
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    load_meta(path)  # the contract still reads it (classes and lists cover every memory)
    return path.stat().st_size


def sample(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded, sorted sample of ``size`` indices out of ``n`` (all of them when fewer)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def step_exemplars(cfg, progress: bool = True, sets=None) -> dict:
    """The build step: exemplars from the config's training split into ``cfg.output``."""
    from .data.splits import Sets

    sets = sets or Sets(cfg)
    train = sets.train
    idx = sample(len(train), SAMPLE, cfg.seed)
    found = exemplars(cfg.output, train.images[idx], train.labels[idx],
                      f"{cfg.data.id} train, {len(idx)} images (seed {cfg.seed})")
    size = write(cfg.output, found)
    kept = sum(len(t) for t in found.images)
    empty = sum(not t for t in found.images)
    print(f"[hopgate-export] exemplars: {kept} thumbnails for {len(found.images)} memories "
          f"({empty} without), bundle {size / 1e6:.2f} MB", flush=True)
    return {"thumbnails": kept, "memories_without": empty, "bytes": size}
