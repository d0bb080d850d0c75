"""The classifier checked against the user's folder before anything is fitted (issue 23).

A wrong preprocessing (scale 1 for 255, mean/std forgotten or applied twice, the wrong size)
does not crash a classifier: it makes it answer one class, or guess. A gate fitted on those
answers is garbage that passes every later check, since they compare the bundle with the same
classifier under the same wrong preprocessing. So, on a sample of the folder:

  * with labels (``labels:``, ``class_names`` or index-named folders): the classifier's
    accuracy under the stated preprocessing, printed;
  * without (pseudo-labels): how well its answers tell the folders apart (the accuracy under
    the best one-to-one folder -> class mapping) and the share of its most frequent answer.

The build stops (exit 2, one line naming the fix) when the figure is near chance (within 3
binomial standard errors of what one constant answer scores: the largest folder's share) --
for pseudo-labels, near chance with one class taking most answers -- or when one of the usual
alternatives scores at least ``MIN_GAIN`` and 3 standard errors (paired, from the images the two
disagree on) more. The alternatives: scale 1 vs 255, mean/std off / 0.5 / ImageNet's / the
folder's own, each with either scale, RGB vs BGR, NCHW vs NHWC, no centre crop, the other
resize modes and filters, and other input sizes where the classifier takes them (TorchScript,
module:factory, ONNX with free height/width). A smaller, significant gain is printed as a note
and the build goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hopgate.service.imaging import decode

from .classifier import run_module
from .config import AttachError, Preprocess
from .surgery import reference

SAMPLE = 256  # folder images the check runs on (3 standard errors ~ 9 points at 50 %)
SCREEN = 64  # of them, the ones every alternative is screened on first
MIN_GAIN = 0.10  # an alternative this much better (and significant) stops the build
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box")


@dataclass
class Trial:
    """One alternative preprocessing: what it is called, the fix it names, and whether the
    folder must be decoded again for it (resize filter, size)."""

    name: str
    fix: str
    pre: Preprocess
    redecode: bool = False


Logits = Callable[[Preprocess, np.ndarray], "np.ndarray | None"]  # None: input refused


def _with(pre: Preprocess, **changes) -> Preprocess:
    values = {**pre.model_dump(), "in_graph": False, **changes}
    return Preprocess.model_validate(values)


def _fmt(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"


def trials(pre: Preprocess, pixels: np.ndarray, integer_input: bool,
           sizes: bool) -> list[Trial]:
    """The usual alternatives to ``pre`` (module docstring); ``pixels`` (the sample, uint8)
    give the folder's own mean/std; ``integer_input``: the classifier takes uint8, so only
    layout, channel order and resizing can differ; ``sizes``: it takes other sizes."""
    out: list[Trial] = []
    c = pre.channels
    if not integer_input:
        unit = pixels.reshape(-1, c).astype(np.float64) / 255.0
        norms = {"no mean/std": ([0.0] * c, [1.0] * c), "mean/std 0.5": ([0.5] * c, [0.5] * c),
                 "your folder's mean/std": (np.round(unit.mean(0), 3).tolist(),
                                            np.round(unit.std(0) + 1e-3, 3).tolist())}
        if c == 3:
            norms["ImageNet's mean/std"] = IMAGENET
        scales = [pre.scale] + [s for s in (255.0, 1.0) if s != pre.scale]
        for scale in scales:
            for label, (mean, std) in [("stated", (pre.mean, pre.std)), *norms.items()]:
                if label != "stated" and (mean, std) == (pre.mean, pre.std):
                    continue  # the stated one under another name
                if scale == pre.scale and label == "stated":
                    continue
                names, fixes = [], []
                if scale != pre.scale:
                    names.append(f"scale: {scale:g}")
                    fixes.append(f"set preprocess.scale: {scale:g}")
                if label == "no mean/std":
                    names.append(label)
                    fixes.append("remove preprocess.mean/std (your graph normalises itself)")
                elif label != "stated":
                    names.append(label)
                    fixes.append(f"set preprocess.mean: {_fmt(mean)}, std: {_fmt(std)} (or "
                                 "your training's own values)")
                fix = " and ".join(fixes)
                if scale == 1 and label == "no mean/std":
                    fix = ("set preprocess.in_graph: true (scale 1, no mean/std: your graph "
                           "normalises 0..255 pixels itself)")
                out.append(Trial(" and ".join(names), fix,
                                 _with(pre, scale=scale, mean=mean, std=std)))
    if c == 3:
        flip = "BGR" if pre.channel_order == "RGB" else "RGB"
        out.append(Trial(f"channel_order: {flip}", f"set preprocess.channel_order: {flip}",
                         _with(pre, channel_order=flip)))
    other = "NHWC" if pre.layout == "NCHW" else "NCHW"
    out.append(Trial(f"layout: {other}", f"set preprocess.layout: {other}",
                     _with(pre, layout=other)))
    if pre.crop != 1:
        out.append(Trial("crop: 1", "set preprocess.crop: 1 (no centre crop)",
                         _with(pre, crop=1.0), redecode=True))
    for mode in ("stretch", "center_crop", "shorter_side"):
        if mode != pre.resize:
            out.append(Trial(f"resize: {mode}", f"set preprocess.resize: {mode}",
                             _with(pre, resize=mode), redecode=True))
    for f in ("auto", *FILTERS):
        if f != pre.resize_filter:
            out.append(Trial(f"resize_filter: {f}", f"set preprocess.resize_filter: {f}",
                             _with(pre, resize_filter=f), redecode=True))
    if sizes:
        h, w = pre.size
        for s in sorted({h // 2, h * 2, 28, 32, 64, 224} - {h}):
            if 8 <= s <= 4 * max(h, 32):
                size = (s, round(w * s / h))
                out.append(Trial(f"size: [{size[0]}, {size[1]}]",
                                 f"set preprocess.size: [{size[0]}, {size[1]}]",
                                 _with(pre, size=size), redecode=True))
    return out


def told_apart(pred: np.ndarray, folders: np.ndarray) -> float:
    """Share of images whose answer is their folder's class under the best one-to-one
    folder -> class mapping (the accuracy pseudo-labels can reach)."""
    from scipy.optimize import linear_sum_assignment

    f_ids, f = np.unique(folders, return_inverse=True)
    c_ids, k = np.unique(pred, return_inverse=True)
    table = np.zeros((len(f_ids), len(c_ids)))
    np.add.at(table, (f, k), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(pred))


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


class Guard:
    """The check of the module docstring on one folder. ``logits(pre, pixels)`` runs the
    classifier (None when it refuses the input); ``files`` are the folder's image files in
    the order of ``pixels``/``folders``; ``index`` maps folder -> class (None: pseudo-labels)."""

    def __init__(self, logits: Logits, pre: Preprocess, pixels: np.ndarray,
                 folders: np.ndarray, files: list[Path], index: np.ndarray | None,
                 integer_input: bool, sizes: bool, seed: int, log: Callable[[str], None]):
        self.logits, self.pre, self.log = logits, pre, log
        rng = np.random.default_rng([seed, 23])
        self.pick = np.sort(rng.permutation(len(pixels))[:SAMPLE])
        self.pixels, self.files = pixels[self.pick], [files[i] for i in self.pick]
        self.folders = folders[self.pick]
        self.truth = None if index is None else index[self.folders]
        self.integer, self.sizes = integer_input, sizes
        self._bytes: dict[int, bytes] = {}

    def score(self, pred: np.ndarray, idx: np.ndarray | slice = slice(None)) -> float:
        if self.truth is not None:
            return float((pred == self.truth[idx]).mean())
        return told_apart(pred, self.folders[idx])

    def _pixels(self, t: Trial, idx: np.ndarray) -> np.ndarray:
        if not t.redecode:
            return self.pixels[idx]
        p = t.pre
        out = []
        for i in idx:
            if i not in self._bytes:
                self._bytes[i] = self.files[i].read_bytes()
            out.append(decode(self._bytes[i], *p.size, p.channels, p.pixels))
        return np.stack(out)

    def _pred(self, t: Trial, idx: np.ndarray) -> tuple[np.ndarray, float] | None:
        """(answers, mean confidence: the top softmax probability) under ``t``."""
        pixels = self._pixels(t, idx)
        if t.redecode and not t.name.startswith("size") and np.array_equal(
                pixels, self.pixels[idx]):
            return None  # the folder is at the classifier's size: the filter changes nothing
        z = self.logits(t.pre, pixels)
        if z is None:
            return None
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        return z.argmax(1), float(p.max(1).mean())

    def run(self) -> dict:
        n = len(self.pick)
        all_idx = np.arange(n)
        z0 = self.logits(self.pre, self.pixels)
        assert z0 is not None  # the stated preprocessing: its errors are raised, not hidden
        pred0 = z0.argmax(1)
        a0 = self.score(pred0)
        groups = self.folders if self.truth is None else self.truth
        chance = float(np.bincount(groups).max() / n)
        near = a0 <= chance + 3 * np.sqrt(chance * (1 - chance) / n)
        top_class, top = np.bincount(pred0).argmax(), float(np.bincount(pred0).max() / n)
        folders = len(np.unique(self.folders))
        if self.truth is not None:
            what = (f"the classifier agrees with your folder labels on {_pct(a0)} of {n} "
                    f"images (chance {_pct(chance)})")
            stop = near
        else:
            what = (f"the classifier tells your {folders} folders apart on {_pct(a0)} of {n} "
                    f"images (chance {_pct(chance)}; {top:.0%} of them answered class "
                    f"{top_class})")
            stop = folders >= 2 and near and top >= 0.5
        report = {"agreement": a0, "chance": chance, "images": n,
                  "labelled": self.truth is not None}
        self.log(what)
        if (1 - a0 < MIN_GAIN and not stop) or (self.truth is None and folders < 2):
            return report  # no alternative could win by MIN_GAIN: nothing to try
        screen = all_idx[:SCREEN]
        tried = []
        for t in trials(self.pre, self.pixels, self.integer, self.sizes):
            got = self._pred(t, screen)
            if got is not None:  # ties go to the more confident answers (the trained size)
                tried.append((self.score(got[0], screen), got[1], t))
        best = max(tried, key=lambda s: s[:2], default=None)
        gain = 0.0
        if best is not None:
            got = self._pred(best[2], all_idx)
            assert got is not None
            pred1, a1 = got[0], self.score(got[0])
            if self.truth is not None:
                differ = int(((pred1 == self.truth) != (pred0 == self.truth)).sum())
            else:
                differ = int((pred1 != pred0).sum())
            gain, se = a1 - a0, np.sqrt(max(differ, 1)) / n
            report.update(best=best[2].name, best_agreement=a1)
            better = f"; with {best[2].name} on {_pct(a1)}: {best[2].fix}"
            if gain >= max(MIN_GAIN, 3 * se) or (stop and gain >= 3 * se):
                raise AttachError(what + better)
            if gain >= 3 * se:
                self.log(f"note: with {best[2].name} the classifier scores {_pct(a1)} "
                         f"({100 * gain:+.1f} points); check preprocess ({best[2].fix})")
        if stop:
            names = ", ".join(t.name for *_, t in tried[:3]) + (", ..." if len(tried) > 3 else "")
            raise AttachError(
                what + f"; none of {len(tried)} usual alternatives ({names}) does better: "
                "check labels/class_names against the classifier's class order, "
                "preprocess.size and the classifier file")
        return report


def probe(extract, module, pre: Preprocess, batch: int = 32) -> Logits:
    """The guard's view of the classifier (``extract``: build.Extractor, its session and input;
    ``module``: the PyTorch module or None): its logits on uint8 pixels under a preprocessing;
    another size runs the PyTorch module (or the graph, when its height and width are free);
    an alternative the classifier refuses gives None, the stated one raises."""
    def logits(p: Preprocess, pixels: np.ndarray) -> np.ndarray | None:
        try:
            if p.size != pre.size and module is not None:
                return np.concatenate([run_module(module, reference(p, pixels[i:i + batch]))
                                       for i in range(0, len(pixels), batch)])
            sess, name, out = extract.sess, extract.input, extract.names[1]
            return np.concatenate([sess.run([out], {name: reference(
                p, pixels[i:i + batch], extract.dtype)})[0]
                for i in range(0, len(pixels), batch)])
        except Exception:
            if p == pre:
                raise
            return None
    return logits
