"""The benchmark report renders: Markdown tables, bold, code and plots become HTML through the
``markdown`` package. Fast tier: a hand-made report, no model."""

from __future__ import annotations

import json

from hopgate.model_export.evaluation import render

METRICS = {"auroc": 0.9, "aupr_in": 0.8, "aupr_out": 0.7, "fpr95_ood_accepted": 0.3,
           "fpr95_id_rejected": 0.2, "detection_error": 0.1, "auroc_ci": (0.85, 0.95)}


def _report():
    table = {m: {"digits": dict(METRICS, auroc=a), "mean far-OOD": dict(METRICS, auroc=a)}
             for m, a in (("RecLag", 0.95), ("MSP", 0.9))}
    bench = {"backbone": "small_resnet", "feature_dim": 64, "test_accuracy": 0.9,
             "sizes": {"test": 10}, "baseline_options": {"knn_k": 50},
             "memory": {"beta": 5.0, "memories": 10, "bank": "per_class", "feature_norm": 10.0,
                        "sampler": "probs", "epochs": 5},
             "calibration": {"threshold": 1.5, "target_tpr": 0.95, "holdout_tpr": 0.95,
                             "test_tpr": 0.94, "gap_points": 1.0, "ood_flagged": {"digits": 0.9}},
             "table": table,
             "plots": {"roc": "q-roc.png", "hist": "q-hist.png", "usage": "q-usage.png",
                       "retrieval": "q-retrieval.png"}}
    return {"hopgate_version": "0", "commit": "abc", "command": "hopgate-export evaluate",
            "machine": {"cpu": "cpu", "cores": 2, "torch": "2"}, "benchmarks": {"quick": bench}}


def test_report_files_render(tmp_path):
    report = _report()
    render.write(report, tmp_path, t0=0.0)
    md = (tmp_path / "README.md").read_text()
    page = (tmp_path / "report.html").read_text()
    assert "| RecLag | **0.950 [0.850, 0.950]** |" in md
    assert page.count("<table>") == 6  # one per metric
    assert "<strong>0.950 [0.850, 0.950]</strong>" in page
    assert "<code>hopgate-export evaluate</code>" in page
    assert '<img alt="ROC" src="q-roc.png"' in page
    assert json.loads((tmp_path / "report.json").read_text())["seconds"] > 0


def test_summary_names_the_shipped_head_and_every_method(tmp_path):
    report = _report()
    report["benchmarks"]["quick"]["table"]["Mahalanobis"] = {
        "digits": dict(METRICS, auroc=0.97, fpr95_ood_accepted=0.1),
        "mean far-OOD": dict(METRICS, auroc=0.97, fpr95_ood_accepted=0.1)}
    render.write(report, tmp_path, t0=0.0)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["config"] == "quick"
    assert s["shipped"]["mean_auroc"] == 0.95 and s["shipped"]["mean_fpr95"] == 0.3
    assert s["shipped"]["method"].startswith("RecLag")
    assert s["methods"]["Mahalanobis"] == {"mean_auroc": 0.97, "mean_fpr95": 0.1}
