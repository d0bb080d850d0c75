"""The benchmark report's files: ``report.json``, ``README.md`` (Markdown) and ``report.html``
(the same Markdown rendered by the ``markdown`` package, plots inline by file name)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import markdown
import numpy as np

from ..data.clientpath import format_table
from .detectors import RECLAG

STYLE = ("body{font-family:sans-serif;max-width:1300px;margin:auto}table{border-collapse:collapse;"
         "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")


METRIC_TITLES = (("auroc", "AUROC"),
                 ("fpr95_ood_accepted", "FPR95 (paper: OOD accepted @ 95 % ID kept)"),
                 ("fpr95_id_rejected", "FPR95 (OpenOOD: ID rejected @ 95 % OOD caught)"),
                 ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"),
                 ("detection_error", "detection error"))
WITH_CI = ("auroc", "fpr95_ood_accepted")  # the metrics shown with bootstrap intervals


def write(report: dict, out: Path, t0: float) -> None:
    """Write the three files to ``out``, with the seconds since ``t0``."""
    report["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_np))
    (out / "summary.json").write_text(json.dumps(summary(report), indent=1, default=_np))
    md = report_markdown(report)
    (out / "README.md").write_text(md)
    (out / "report.html").write_text(to_html(md))


def summary(report: dict) -> dict:
    """The machine-readable headline: per benchmark (the first is the shipped bundle's config),
    the mean far-OOD AUROC and FPR95 (paper convention) of the bundle's own head and of every
    method on the same features."""
    def means(b: dict) -> dict:
        return {m: {"mean_auroc": rows["mean far-OOD"]["auroc"],
                    "mean_fpr95": rows["mean far-OOD"]["fpr95_ood_accepted"]}
                for m, rows in b["table"].items()}
    out: dict = {}
    for i, (name, b) in enumerate(report["benchmarks"].items()):
        methods = means(b)
        mem = b["memory"]
        entry = {"shipped": {"method": f"{RECLAG}: RecLag, {mem.get('geometry', 'dot')} geometry, "
                                       f"beta {mem['beta']}, M {mem['memories']}",
                             **methods[RECLAG]},
                 "methods": methods, "test_accuracy": b["test_accuracy"],
                 "calibration": b["calibration"]}
        if i == 0:
            out.update(entry, config=name)
        else:
            out.setdefault("other_backbones", {})[name] = entry
    return out


def to_html(md: str) -> str:
    """A self-contained page: the Markdown (tables included) rendered, plots by file name."""
    body = markdown.markdown(md, extensions=["tables"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hopgate OOD benchmark"
            f"</title><style>{STYLE}</style></head><body>{body}</body></html>")


def _np(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x))


def _ci(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_ci", (None, None))
    return "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"


def report_markdown(report: dict) -> str:
    """The report as Markdown: one section per benchmark, tables per metric, ablations, plots."""
    L = ["# hopgate OOD benchmark: RecLag vs post-hoc baselines", "",
         f"hopgate {report['hopgate_version']}, commit `{report['commit']}`; machine: "
         f"{report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
         f"{report['machine']['torch']}; {report['seconds']} s.", "",
         f"Rebuild: `{report['command']}`", "",
         "Scores: higher = more ID; ID is the positive class. **FPR95 (paper)** = share of OOD "
         "accepted when the threshold keeps 95 % of ID (RecLag/SHE/Hendrycks convention). "
         "**FPR95 (OpenOOD)** = share of ID rejected when the threshold catches 95 % of OOD. "
         "Brackets: 95 % bootstrap intervals (resampling ID and OOD). Every method is fitted on "
         "and scores the same cached penultimate features and logits (baselines on the correctly "
         "classified training features RecLag's banks are fitted on); what differs is only what "
         "a method does to them itself: the dot geometry rescales features to `feature_norm` "
         "before its banks, the gaussian geometry (the shipped head) whitens them, ReAct clips "
         "them, ViM projects them. `summary.json` holds the mean far-OOD figures.", ""]
    for name, b in report["benchmarks"].items():
        L += [f"## {name}: {b['backbone']} (D = {b['feature_dim']}), ID test accuracy "
              f"{b['test_accuracy']:.4f}", "",
              f"Sizes: {b['sizes']}. RecLag memory settings: beta {b['memory']['beta']}, "
              f"{b['memory'].get('geometry', 'dot')} geometry, "
              f"M {b['memory']['memories']}, {b['memory']['bank']} banks, feature_norm "
              f"{b['memory']['feature_norm']}, sampler {b['memory']['sampler']}, "
              f"{b['memory']['epochs']} fitting epochs. "
              f"Baseline options: {b['baseline_options']}.", ""]
        cal = b["calibration"]
        L += [f"**Calibration.** Threshold {cal['threshold']:.3f} (target TPR {cal['target_tpr']}) "
              f"accepts {cal['holdout_tpr']:.4f} of the hold-out it was set on and "
              f"**{cal['test_tpr']:.4f} of the ID test split it never saw** "
              f"({cal['gap_points']:.2f} points from the target). Share of each OOD set flagged: "
              + ", ".join(f"{k} {v:.3f}" for k, v in cal["ood_flagged"].items()) + ".", ""]
        if b.get("encodings"):
            L += ["**As clients send them.** The same unseen ID test images resized by a client, "
                  "encoded, then decoded and resized by the service "
                  "(`model_export/data/clientpath.py`): share the threshold accepts and classifier "
                  "accuracy per encoding.", ""]
            L += format_table(b["encodings"], cal["target_tpr"]) + [""]
        sets = list(b["table"][RECLAG])
        for metric, label in METRIC_TITLES:
            L += [f"### {label}", "", "| method | " + " | ".join(sets) + " |",
                  "|---" * (len(sets) + 1) + "|"]
            best = {k: (max if metric.startswith("au") else min)(
                b["table"][m][k][metric] for m in b["table"]) for k in sets}
            for method, rows in b["table"].items():
                cells = []
                for k in sets:
                    v = rows[k][metric]
                    cell = f"{v:.3f}" + (_ci(rows[k], metric) if metric in WITH_CI else "")
                    cells.append(f"**{cell}**" if abs(v - best[k]) < 1e-12 else cell)
                L.append(f"| {method} | " + " | ".join(cells) + " |")
            L.append("")
        if "ablations" in b:
            L += [f"### Ablations (banks refitted from cached features, {b['ablation_epochs']} "
                  "epochs each; mean over far-OOD sets)", "",
                  "| variant | mean AUROC | mean FPR95 (paper) | AUROC per set | fit s |",
                  "|---|---|---|---|---|"]
            for r in b["ablations"]:
                if "mean_auroc" in r:
                    per = ", ".join(f"{k} {v:.3f}" for k, v in r["auroc"].items())
                    L.append(f"| {r['variant']} | {r['mean_auroc']:.4f} | {r['mean_fpr95']:.4f} | "
                             f"{per} | {r['fit_seconds']} |")
            L += ["", "Unrolled steps T (the score is the quantity that decides the verdict, "
                  "the lowest gate score along the first T steps, calibrated per T):",
                  "",
                  "| T | ID test accepted | OOD flagged per set |", "|---|---|---|"]
            for r in b["ablations"]:
                if "steps" in r:
                    L.append(f"| {r['steps']} | {r['id_accepted']:.4f} | " + ", ".join(
                        f"{k} {v:.3f}" for k, v in r["ood_flagged"].items()) + " |")
            L.append("")
        p = b["plots"]
        L += ["### Plots", "", f"![ROC]({p['roc']})", "", f"![histograms]({p['hist']})", "",
              f"![memory usage]({p['usage']})", "", f"![retrieved memories]({p['retrieval']})", ""]
    return "\n".join(L)
