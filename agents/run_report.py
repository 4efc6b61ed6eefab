"""A run's report.html: one self-contained page (images inlined) with every case's verdict."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from agents.batch import read_results


def _png_data(arr: np.ndarray) -> str:
    from PIL import Image

    img = Image.fromarray(arr)
    img.thumbnail((320, 320))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def study_thumbnails(case_dir: Path) -> list[tuple[str, str]]:
    """(caption, base64 PNG) per study: mid axial CT slice (lung window), radiograph, slide thumbnail."""
    from core.case import Modality, load_case
    from core.errors import CaseDataError
    from core.imaging.load import load_study

    out = []
    try:
        case = load_case(case_dir)
    except CaseDataError:
        return out
    for s in case.studies:
        try:
            img = load_study(case_dir, s)
        except CaseDataError:
            continue
        try:
            if s.modality in (Modality.CT, Modality.MR):
                sl = img.array[img.array.shape[0] // 2]
                arr = (np.clip((sl + 1000) / 1400, 0, 1) * 255).astype(np.uint8)
            elif s.modality == Modality.XR:
                arr = (np.clip(img.array, 0, 1) * 255).astype(np.uint8)
            else:
                arr = img.thumbnail(320)
        finally:
            close = getattr(img, "close", None)
            if callable(close):
                close()
        out.append((f"{s.id}: {s.modality.value} {s.description}", _png_data(arr)))
    return out


def write_report(run: Path) -> Path:
    rows = read_results(run / "results.jsonl")
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Grand Rounds run</title><style>",
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
             ".case{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}"
             ".ok{color:#176f2c}.bad{color:#a11}.imgs img{margin:4px;border:1px solid #ddd}"
             "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}",
             "</style></head><body>", f"<h1>Grand Rounds — {e(run.name)}</h1>"]
    decided = [r for r in rows.values() if r["status"] == "decided"]
    scored = [r for r in decided if r.get("truth")]
    acc = sum(r["truth"] == r["verdict"]["diagnosis"] for r in scored) / len(scored) if scored else None
    parts.append(f"<p>{len(rows)} cases: {len(decided)} decided, "
                 f"{sum(r['status'] == 'awaiting_review' for r in rows.values())} awaiting review, "
                 f"{sum(r['status'] == 'invalid' for r in rows.values())} invalid"
                 + (f"; top-1 accuracy against truth {acc:.0%} ({len(scored)} cases)" if acc is not None else "")
                 + "</p>")
    for cid, r in sorted(rows.items()):
        parts.append(f"<div class='case' id='{e(cid)}'><h2>{e(cid)}</h2>")
        v = r.get("verdict")
        if r["status"] == "invalid":
            parts.append(f"<p class='bad'>invalid case: {e(r.get('error', ''))}</p>")
        elif v is None:
            votes = (r.get("review") or {}).get("votes", {})
            parts.append(f"<p><b>Awaiting human review</b>; panel votes: {e(str(votes))}</p>")
        else:
            truth = r.get("truth")
            mark = "" if not truth else (" <span class='ok'>✓ matches truth</span>" if truth == v["diagnosis"]
                                         else f" <span class='bad'>✗ truth: {e(truth)}</span>")
            parts.append(f"<p><b>{e(v['diagnosis_name'])}</b> — confidence {v['confidence']:.2f}, "
                         f"decided by {e(v['decided_by'])}{mark}</p>")
            parts.append("<table><tr><th>differential</th><th>p</th></tr>" + "".join(
                f"<tr><td>{e(d['diagnosis'])}</td><td>{d['probability']:.2f}</td></tr>" for d in v["differential"])
                + "</table>")
            if v["rationale"]:
                parts.append("<ul>" + "".join(
                    f"<li>{e(c['statement'])} <small>[{e(', '.join(c['cites']))}]"
                    f"{'' if c.get('valid') else ' <span class=bad>unsupported</span>'}</small></li>"
                    for c in v["rationale"]) + "</ul>")
            if v["tool_failures"]:
                parts.append("<p class='bad'>Tool failures: " + e("; ".join(v["tool_failures"])) + "</p>")
            if v.get("warnings"):
                parts.append("<p class='bad'>Warnings: " + e("; ".join(v["warnings"])) + "</p>")
        imgs = []
        art = run / "artefacts" / cid
        for p in sorted(art.glob("*.png")) if art.is_dir() else []:
            imgs.append((p.stem, base64.b64encode(p.read_bytes()).decode()))
        if r.get("case_dir"):
            imgs += study_thumbnails(Path(r["case_dir"]))
        if imgs:
            parts.append("<div class='imgs'>" + "".join(
                f"<figure style='display:inline-block'><img src='data:image/png;base64,{b}' width='240'>"
                f"<figcaption><small>{e(c)}</small></figcaption></figure>" for c, b in imgs) + "</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = run / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("".join(parts))
    tmp.replace(path)
    return path
