"""The files `stdit eval` writes (stdit/evaluate.py measures): results.json, results.md, a contact sheet per mode
(contact_MODE.png: a row per clip, a column per frame, given frames outlined in green), TensorBoard scalars (tb/) and
report.html, a static page with the table beside the contact sheets that opens from disk without a server."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stdit.data.video import to_uint8

COLUMNS = [("background", "background"), ("object_colour", "object colour"), ("direction", "direction"),
           ("shape", "shape")]


def _percent(acc: dict) -> str:
    return "—" if acc["accuracy"] is None else f"{acc['accuracy']:.0%} ({acc['correct']}/{acc['n']})"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per mode, then chance) of the results table, shared by the markdown and the HTML."""
    header = ["mode", "n"] + [title for _, title in COLUMNS] + ["given frames kept (max abs err)",
                                                                "boundary jump (x typical, median)"]
    rows = []
    for name, r in results["modes"].items():
        kept, jump = r.get("kept_max_abs_error"), r.get("jump_ratio_median")
        rows.append([name, str(r["n"])] + [_percent(r["accuracy"][key]) for key, _ in COLUMNS]
                    + ["—" if kept is None else f"{kept:.3g}", "—" if jump is None else f"{jump:.2f}"])
    chance = next(iter(results["modes"].values()))["chance"]
    rows.append(["chance", ""] + [f"{chance[key]:.0%}" for key, _ in COLUMNS] + ["(ideal 0)", "(ideal ~1)"])
    return header, rows


def markdown(results: dict) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def contact_sheet(videos, records, givens, scale_to: int = 64) -> Image.Image:
    """Rows = clips, columns = frames (nearest-neighbour upscaled to about `scale_to` px), each row under a line with
    the caption and one with what was measured; given frames outlined in green."""
    font = ImageFont.load_default()
    frames = [to_uint8(v).numpy() for v in videos]  # [T, H, W, 3] each
    side = max(max(f.shape[1], f.shape[2]) for f in frames)
    scale = -(-scale_to // side)
    cell, gap, text_h = side * scale, 4, 28
    texts = []
    for i, rec in enumerate(records):
        marks = ", ".join(f"{k} {'ok' if rec[k + '_ok'] else 'NO'}" for k in ("bg", "fg", "direction", "shape")
                          if rec[k + "_ok"] is not None)
        seen = f"{rec['fg']} {rec['shape']}" + (f" moving {rec['direction']}" if rec["direction"] else "")
        texts.append((f"{i}: {rec['caption']}", f"measured: {seen} on {rec['bg']}  [{marks}]"))
    width = max(max(len(f) for f in frames) * (cell + gap), max(font.getlength(t) for pair in texts for t in pair))
    sheet = Image.new("RGB", (int(width) + 2 * gap, len(frames) * (text_h + cell + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (clip, (caption, seen), given) in enumerate(zip(frames, texts, givens)):
        top = gap + i * (text_h + cell + gap)
        draw.text((gap, top), caption, fill="black", font=font)
        draw.text((gap, top + 13), seen, fill="dimgray", font=font)
        for t, frame in enumerate(clip):
            img = Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
            x, y = gap + t * (cell + gap), top + text_h
            sheet.paste(img, (x, y))
            if given is not None and given[t]:
                draw.rectangle([x, y, x + img.width - 1, y + img.height - 1], outline=(0, 200, 0), width=2)
    return sheet


def _html(results: dict, sheets: list[str]) -> str:
    header, rows = table_rows(results)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    figures = "".join(f'<figure><img src="{esc(s)}" alt="contact sheet {esc(m)}"><figcaption>{esc(m)}: rows = '
                      f"clips, columns = frames</figcaption></figure>" for m, s in zip(results["modes"], sheets))
    about = (f"run {esc(results['run'])}, step {results['step']}, {results['steps']} sampling steps, guidance "
             f"{results['cfg_scale']}, seed {results['seed']}, {results['weights']} weights")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stdit eval: {esc(results['run'])}</title>
<style>body{{font-family:sans-serif;margin:1em}} .side{{display:flex;gap:2em;align-items:flex-start}}
table{{border-collapse:collapse}} th,td{{border:1px solid #999;padding:2px 6px}}
td{{text-align:right;white-space:nowrap}} img{{image-rendering:pixelated}} figure{{margin:0 0 1em 0}}</style></head>
<body><h1>stdit eval</h1><p>{about}</p>
<div class="side"><div><table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>Measured from pixels: nearest palette colour of the most common pixels (background) and of the rest (object),
the sign of the object's centroid motion (direction), the best-fitting outline (shape).</p></div>
<div>{figures}</div></div></body></html>
"""


def write_report(out: Path, results: dict, shown: dict) -> None:
    """Write every output of a finished evaluation; shown[mode] = (pixel videos, given-frame masks or Nones)."""
    from torch.utils.tensorboard import SummaryWriter
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    writer = SummaryWriter(str(out / "tb"))
    sheets = []
    for name, r in results["modes"].items():
        videos, givens = shown[name]
        sheet = contact_sheet(videos, r["clips"], givens)
        sheets.append(f"contact_{name}.png")
        sheet.save(out / sheets[-1])
        writer.add_image(f"eval/{name}/contact_sheet", np.asarray(sheet), results["step"], dataformats="HWC")
        for key, _ in COLUMNS:
            if r["accuracy"][key]["accuracy"] is not None:
                writer.add_scalar(f"eval/{name}/{key}", r["accuracy"][key]["accuracy"], results["step"])
        for key in ("kept_max_abs_error", "jump_ratio_median"):
            if r.get(key) is not None:
                writer.add_scalar(f"eval/{name}/{key}", r[key], results["step"])
    writer.close()
    (out / "report.html").write_text(_html(results, sheets))
