"""The files `stdit eval` writes (stdit/evaluate.py generates, stdit/eval_measure.py reads): results.json,
results.md, a contact sheet per mode (contact_MODE.png: a row per clip, a column per frame, given frames outlined in
green) and per long-video scheme and length (contact_long_SCHEME_Fx.png: every s-th frame so a row fits, frames of
chunks that went wrong outlined in red), TensorBoard scalars (tb/) and report.html, a static page with the tables
beside the contact sheets that opens from disk without a server."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stdit.data.video import to_uint8

COLUMNS = [("background", "background"), ("object_colour", "object colour"), ("direction", "direction"),
           ("shape", "shape")]
LONG_COLUMNS = [("background", "background"), ("object_colour", "object colour"), ("shape", "shape"),
                ("direction", "direction")]
GREEN, RED = (0, 200, 0), (220, 0, 0)


def _percent(acc: dict) -> str:
    return "—" if acc["accuracy"] is None else f"{acc['accuracy']:.0%} ({acc['correct']}/{acc['n']})"


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per short mode, then chance) of the results table, shared by the markdown and the
    HTML; no rows when no short mode was evaluated."""
    header = ["mode", "n"] + [title for _, title in COLUMNS] + [
        "given frames kept (max abs err)", "boundary jump (x typical, median)", "jump <= 1.5x (clips)",
        "loop closure (x typical, median)"]
    rows = []
    for name, r in results["modes"].items():
        rows.append([name, str(r["n"])] + [_percent(r["accuracy"][key]) for key, _ in COLUMNS]
                    + [_num(r.get("kept_max_abs_error"), ".3g"), _num(r.get("jump_ratio_median"), ".2f"),
                       _num(r.get("jump_within_target"), ".0%"), _num(r.get("closure_ratio_median"), ".2f")])
    if rows:
        chance = next(iter(results["modes"].values()))["chance"]
        rows.append(["chance", ""] + [f"{chance[key]:.0%}" for key, _ in COLUMNS]
                    + ["(ideal 0)", "(ideal ~1)", "(target 100%)", "(ideal ~1)"])
    return header, rows


def long_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows (length x scheme: the schemes side by side at each length) of the long-video table. Every
    chunk of `window` frames is scored on its own: accuracies are over all chunks; `every chunk right` is the
    fraction of clips whose every chunk has the right background, object colour and shape."""
    header = ["scheme", "length", "n"] + [f"{title} (chunks)" for _, title in LONG_COLUMNS] + [
        "every chunk right (clips)", "right by chunk (%)", "object colour vs t2v (points)"]
    short = results["modes"].get("t2v", {}).get("accuracy", {}).get("object_colour", {}).get("accuracy")
    entries = [r for by_length in results.get("long", {}).values() for r in by_length.values()]
    rows = []
    for r in sorted(entries, key=lambda r: r["factor"]):  # stable: the schemes in evaluation order at each length
        fg = r["accuracy"]["object_colour"]["accuracy"]
        whole = round(r["whole_length"] * r["n"])
        rows.append([r["scheme"], f"{r['factor']}x ({r['frames']} frames)", str(r["n"])]
                    + [_percent(r["accuracy"][key]) for key, _ in LONG_COLUMNS]
                    + [f"{r['whole_length']:.0%} ({whole}/{r['n']})",
                       " ".join(f"{x * 100:.0f}" for x in r["right_by_chunk"]),
                       "—" if short is None or fg is None else f"{(fg - short) * 100:+.0f}"])
    return header, rows


def notes(results: dict) -> list[str]:
    """Lines under the tables: the edit mode's source check, modes skipped and why."""
    lines = []
    edit = results["modes"].get("edit")
    if edit and "source_accuracy" in edit:
        src = edit["source_accuracy"]
        lines.append(f"edit (strength {results.get('strength')}): the output still shows the edited clip's own "
                     f"background in {_percent(src['background'])}, object colour {_percent(src['object_colour'])}, "
                     f"shape {_percent(src['shape'])}, direction {_percent(src['direction'])} (the prompt's "
                     "attributes all differ from it)")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return lines


def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                           for r in rows]


def markdown(results: dict) -> str:
    """The short-mode table, then (when evaluated) the long-video table, then notes."""
    parts = []
    header, rows = table_rows(results)
    if rows:
        parts.append("\n".join(_md_table(header, rows)))
    header, rows = long_rows(results)
    if rows:
        parts.append(f"Long videos: window {results['window']} model frames; every chunk of {results['window']} "
                     "frames scored on its own.\n\n" + "\n".join(_md_table(header, rows)))
    extra = notes(results)
    if extra:
        parts.append("\n".join(f"- {line}" for line in extra))
    return "\n\n".join(parts) + "\n"


def _sheet(rows, scale_to: int = 64, stride: int = 1) -> Image.Image:
    """rows: (uint8 frames [T, H, W, 3], (caption line, second line), outline colour per frame or None). Every
    `stride`-th frame, nearest-neighbour upscaled to about `scale_to` px."""
    font = ImageFont.load_default()
    side = max(max(f.shape[1], f.shape[2]) for f, _, _ in rows)
    scale = -(-scale_to // side)
    cell, gap, text_h = side * scale, 4, 28
    columns = max(len(range(0, len(f), stride)) for f, _, _ in rows)
    width = max(columns * (cell + gap), max(font.getlength(t) for _, pair, _ in rows for t in pair))
    sheet = Image.new("RGB", (int(width) + 2 * gap, len(rows) * (text_h + cell + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (clip, (first, second), outline) in enumerate(rows):
        top = gap + i * (text_h + cell + gap)
        draw.text((gap, top), first, fill="black", font=font)
        draw.text((gap, top + 13), second, fill="dimgray", font=font)
        for col, t in enumerate(range(0, len(clip), stride)):
            frame = clip[t]
            img = Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
            x, y = gap + col * (cell + gap), top + text_h
            sheet.paste(img, (x, y))
            if outline is not None and outline[t] is not None:
                draw.rectangle([x, y, x + img.width - 1, y + img.height - 1], outline=outline[t], width=2)
    return sheet


def _seen(rec: dict) -> str:
    marks = ", ".join(f"{k} {'ok' if rec[k + '_ok'] else 'NO'}" for k in ("bg", "fg", "direction", "shape")
                      if rec[k + "_ok"] is not None)
    motion = f" moving {rec['direction']}" if rec["direction"] else ""
    return f"{rec['fg']} {rec['shape']}{motion} on {rec['bg']}  [{marks}]"


def contact_sheet(videos, records, givens, scale_to: int = 64) -> Image.Image:
    """Rows = clips, columns = frames (nearest-neighbour upscaled to about `scale_to` px), each row under a line with
    the caption and one with what was measured (and the boundary jump / loop closure ratios); given frames
    outlined in green."""
    rows = []
    for i, (video, rec, given) in enumerate(zip(videos, records, givens)):
        extra = "".join(f"  {label} x{rec[key]:.2f}" for key, label in (("jump_ratio", "jump"),
                                                                          ("closure_ratio", "closure"))
                        if rec.get(key) is not None)
        source = f"  (edited from: {rec['source']})" if rec.get("source") else ""
        outline = None if given is None else [GREEN if g else None for g in given.tolist()]
        rows.append((to_uint8(video).numpy(), (f"{i}: {rec['caption']}{source}", f"measured: {_seen(rec)}{extra}"),
                     outline))
    return _sheet(rows, scale_to)


def long_contact_sheet(videos, records, max_columns: int = 24, scale_to: int = 48) -> Image.Image:
    """Long clips, one per row, every s-th frame (s chosen so a row has at most `max_columns` frames); frames of
    chunks that are not right (background, object colour or shape wrong) outlined in red."""
    frames = max(v.shape[1] for v in videos)
    stride = max(1, math.ceil(frames / max_columns))
    rows = []
    for i, (video, rec) in enumerate(zip(videos, records)):
        outline = [None] * video.shape[1]
        for (a, b), ok in zip(rec["spans"], rec["right"]):
            for t in range(a, b):
                outline[t] = None if ok else RED
        wrong = [f"chunk {j}: {_seen(c)}" for j, (c, ok) in enumerate(zip(rec["chunks"], rec["right"])) if not ok]
        second = (f"frame stride {stride}; chunks right {sum(rec['right'])}/{len(rec['right'])}"
                  + (f"; first wrong {wrong[0]}" if wrong else ""))
        rows.append((to_uint8(video).numpy(), (f"{i}: {rec['caption']}", second), outline))
    return _sheet(rows, scale_to, stride)


def _html_table(table_id: str, header, rows) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _html(results: dict, sheets: list[tuple[str, str]]) -> str:
    esc = html.escape
    header, rows = table_rows(results)
    tables = _html_table("results", header, rows) if rows else "<p>no short mode evaluated</p>"
    header, rows = long_rows(results)
    if rows:
        tables += (f"<h2>Long videos</h2><p>window {results['window']} model frames; every chunk of "
                   f"{results['window']} frames scored on its own</p>" + _html_table("long", header, rows))
    extra = notes(results)
    if extra:
        tables += "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in extra) + "</ul>"
    figures = "".join(f'<figure><img src="{esc(s)}" alt="contact sheet {esc(m)}"><figcaption>{esc(m)}: rows = '
                      f"clips, columns = frames</figcaption></figure>" for m, s in sheets)
    about = (f"run {esc(results['run'])}, step {results['step']}, {results['steps']} sampling steps, guidance "
             f"{results['cfg_scale']} (with given frames {results.get('cfg_scale_given') or results['cfg_scale']}), "
             f"seed {results['seed']}, {results['weights']} weights")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stdit eval: {esc(results['run'])}</title>
<style>body{{font-family:sans-serif;margin:1em}} .side{{display:flex;gap:2em;align-items:flex-start}}
table{{border-collapse:collapse}} th,td{{border:1px solid #999;padding:2px 6px}}
td{{text-align:right;white-space:nowrap}} img{{image-rendering:pixelated}} figure{{margin:0 0 1em 0}}</style></head>
<body><h1>stdit eval</h1><p>{about}</p>
<div class="side"><div>{tables}
<p>Measured from pixels: nearest palette colour of the most common pixels (background) and of the rest (object),
the sign of the object's centroid motion (direction), the best-fitting outline (shape). Conditioned modes score
the generated frames only.</p></div>
<div>{figures}</div></div></body></html>
"""


def write_report(out: Path, results: dict, shown: dict, shown_long: dict | None = None) -> None:
    """Write every output of a finished evaluation; shown[mode] = (pixel videos, given-frame masks or Nones),
    shown_long[mode]["Fx"] = pixel videos."""
    from torch.utils.tensorboard import SummaryWriter
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    writer = SummaryWriter(str(out / "tb"))
    sheets = []

    def add(tag: str, sheet: Image.Image, file: str) -> None:
        sheet.save(out / file)
        sheets.append((tag, file))
        writer.add_image(f"eval/{tag}/contact_sheet", np.asarray(sheet), results["step"], dataformats="HWC")

    for name, r in results["modes"].items():
        videos, givens = shown[name]
        add(name, contact_sheet(videos, r["clips"], givens), f"contact_{name}.png")
        for key, _ in COLUMNS:
            if r["accuracy"][key]["accuracy"] is not None:
                writer.add_scalar(f"eval/{name}/{key}", r["accuracy"][key]["accuracy"], results["step"])
        for key in ("kept_max_abs_error", "jump_ratio_median", "jump_within_target", "closure_ratio_median"):
            if r.get(key) is not None:
                writer.add_scalar(f"eval/{name}/{key}", r[key], results["step"])
    for name, by_length in results.get("long", {}).items():
        for length, r in by_length.items():
            tag = f"{name}_{length}"
            add(tag, long_contact_sheet(shown_long[name][length], r["clips"]), f"contact_{tag}.png")
            for key, _ in LONG_COLUMNS:
                if r["accuracy"][key]["accuracy"] is not None:
                    writer.add_scalar(f"eval/{name}/{length}/{key}", r["accuracy"][key]["accuracy"], results["step"])
            writer.add_scalar(f"eval/{name}/{length}/whole_length", r["whole_length"], results["step"])
    writer.close()
    (out / "report.html").write_text(_html(results, sheets))
