"""hopgate-screen's summary of a results file: OOD share per predicted class, the most OOD
images (lowest score), errors by reason; as a dict (``summary.json``), as text (printed), and
as a small self-contained HTML page with the most OOD images inline (base64 PNG thumbnails:
the page opens anywhere, with no files beside it).

The class is the classifier's guess; for an OOD image it is a guess outside the domain the
classifier knows, which is why the share is per *predicted* class.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path
from typing import Any

Row = dict[str, Any]
THUMB = 96  # thumbnail side in pixels


def summarise(rows: list[Row], top: int = 24) -> dict[str, Any]:
    scored = [r for r in rows if r.get("error_status") is None and r.get("score") is not None]
    ood = [r for r in scored if r.get("ood")]
    by_class: dict[str, dict[str, Any]] = {}
    for r in scored:
        c = by_class.setdefault(str(r.get("label")), {"images": 0, "ood": 0})
        c["images"] += 1
        c["ood"] += bool(r.get("ood"))
    for c in by_class.values():
        c["ood_share"] = round(c["ood"] / c["images"], 4)
    most = sorted(scored, key=lambda r: r["score"])[:top]
    versions = sorted({str(r["model_version"]) for r in scored if r.get("model_version")})
    return {
        "images": len(rows), "scored": len(scored), "errors": len(rows) - len(scored),
        "ood": len(ood), "ood_share": round(len(ood) / len(scored), 4) if scored else None,
        "by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1]["ood_share"])),
        "most_ood": [{k: r.get(k) for k in ("path", "score", "p_value", "ood", "label")}
                     for r in most],
        "errors_by_reason": dict(Counter(str(r.get("error_reason")) for r in rows
                                         if r.get("error_status") is not None)),
        "threshold": next((r["threshold"] for r in scored if r.get("threshold") is not None),
                          None),
        "model_versions": versions,
    }


def text(summary: dict[str, Any], top: int = 10) -> str:
    s = summary
    share = "-" if s["ood_share"] is None else f"{100 * s['ood_share']:.1f} %"
    lines = [f"{s['images']} images: {s['scored']} scored, {s['errors']} errors; "
             f"OOD {s['ood']} ({share})"]
    if s["by_class"]:
        lines.append(f"  {'predicted class':<18} {'images':>7} {'OOD':>6} {'share':>7}")
        for name, c in s["by_class"].items():
            lines.append(f"  {name:<18} {c['images']:>7} {c['ood']:>6} "
                         f"{100 * c['ood_share']:>6.1f}%")
    if s["most_ood"]:
        lines.append(f"most OOD (lowest score; threshold {s['threshold']:.2f}):")
        lines += [f"  {r['score']:>10.2f}  p={r['p_value']:.2g}  {r['path']}"
                  for r in s["most_ood"][:top]]
    if s["errors_by_reason"]:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in s["errors_by_reason"].items()))
    return "\n".join(lines)


def thumbnail(path: str) -> str | None:
    """A data: URL of a PNG thumbnail of the image at ``path``, or None if unreadable."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.seek(0)
            im = im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode)
            im.thumbnail((THUMB, THUMB))
            if max(im.size) < THUMB:  # small images (28 px) scaled up, pixels kept sharp
                k = THUMB // max(im.size)
                im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
            buf = io.BytesIO()
            im.save(buf, "PNG")
    except Exception:  # any unreadable file: the page shows its row without a picture
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def page(summary: dict[str, Any], title: str = "hopgate-screen") -> str:
    s, e = summary, html.escape
    share = "-" if s["ood_share"] is None else f"{100 * s['ood_share']:.1f} %"
    threshold = "-" if s["threshold"] is None else f"{s['threshold']:.2f}"
    classes = "".join(
        f"<tr><td>{e(name)}</td><td>{c['images']}</td><td>{c['ood']}</td>"
        f"<td>{100 * c['ood_share']:.1f} %</td></tr>" for name, c in s["by_class"].items())
    cards = []
    for r in s["most_ood"]:
        src = thumbnail(r["path"])
        img = f'<img src="{src}" alt="">' if src else '<div class="none">unreadable</div>'
        cards.append(
            f'<figure>{img}<figcaption><b>{r["score"]:.2f}</b> p={r["p_value"]:.2g}<br>'
            f'guess: {e(str(r["label"]))}<br><span title="{e(r["path"])}">'
            f'{e(Path(r["path"]).name)}</span></figcaption></figure>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}}
table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:6px;width:{THUMB + 40}px;vertical-align:top;
font-size:12px;text-align:center}}
img,.none{{width:{THUMB}px;height:{THUMB}px;image-rendering:pixelated;border:1px solid #ccc}}
span{{word-break:break-all}}
</style></head><body>
<h1>{e(title)}</h1>
<p>{s['images']} images: {s['scored']} scored, {s['errors']} errors; OOD {s['ood']}
({share}). Threshold {threshold}; model {e(", ".join(s['model_versions']))}.</p>
<h2>OOD share per predicted class</h2>
<p>For an OOD image the class is the classifier's guess outside its domain.</p>
<table><tr><th>predicted class</th><th>images</th><th>OOD</th><th>share</th></tr>
{classes}</table>
<h2>The {len(s['most_ood'])} most OOD images (lowest score first)</h2>
{"".join(cards)}
</body></html>
"""
