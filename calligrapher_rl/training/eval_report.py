"""The evaluation's files: eval.json, report.md, report.html, a grid picture per checkpoint and every sample.

    DIR/eval.json                        the numbers (docs/evaluation.md; the contract's shape)
    DIR/report.md, DIR/report.html       the table with 95% intervals, the paired verdicts, the grids
    DIR/grid-<checkpoint>.png            rows = examples, columns = noises; under each cell what OCR read and
                                         its OCR score
    DIR/images/<checkpoint>/eNNN-nKK.png every sample at full size (the HTML grid links to them)
"""

from __future__ import annotations

import html
import os

from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_path, write_text

MAX_COLS, MAX_ROWS, MIN_CELL = 8, 16, 128
METRIC_LABELS = {"ocr": "OCR reward", "ocr_exact": "OCR exact match", "ocr_edit_distance": "edit distance (norm.)",
                 "style": "style similarity", "preservation_mae": "outside-mask abs. diff.",
                 "preservation_psnr": "outside-mask PSNR dB"}


def fmt(entry: dict, digits: int = 3) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def caption(sample: dict) -> str:
    read = sample.get("read") or "(none)"
    score = sample.get("ocr")
    return f"{read} · {score:.2f}" if isinstance(score, float) else read


def grid_picture(images: list[Image.Image], samples: list[dict]) -> Image.Image:
    """Examples as rows, noises as columns (at most 16 x 8), each cell at least 128 px with its caption."""
    rows: dict[int, list[int]] = {}
    for j, s in enumerate(samples):
        rows.setdefault(s["example"], []).append(j)
    shown = [js[:MAX_COLS] for _, js in sorted(rows.items())[:MAX_ROWS]]
    w, h = images[0].size
    scale = max(1, -(-MIN_CELL // max(w, h)))
    cw, ch, strip = w * scale, h * scale, 18
    font = _font(13)
    sheet = Image.new("RGB", (cw * max(len(r) for r in shown), (ch + strip) * len(shown)), "white")
    draw = ImageDraw.Draw(sheet)
    for y, js in enumerate(shown):
        for x, j in enumerate(js):
            sheet.paste(images[j].convert("RGB").resize((cw, ch), Image.NEAREST), (x * cw, y * (ch + strip)))
            s = samples[j]
            good = (s.get("ocr_exact") or 0) >= 1
            draw.text((x * cw + 3, y * (ch + strip) + ch + 2), caption(s)[:24], fill=(0, 120, 0) if good else (160, 0, 0),
                      font=font)
    return sheet


def _table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    metrics = list(report["checkpoints"][0]["rewards"])
    head = ["checkpoint", *[METRIC_LABELS.get(m, m) for m in metrics]]
    body = [[c["name"], *[fmt(c["rewards"][m]) if m in c["rewards"] else "—" for m in metrics]]
            for c in report["checkpoints"]]
    return head, body


def _paired_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["A", "B", "metric", "mean(B - A) [95% CI]", "verdict"]
    body = [[p["a"], p["b"], METRIC_LABELS.get(p["reward"], p["reward"]),
             f"{p['diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]", p["verdict"]] for p in report["paired"]]
    return head, body


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def settings_line(report: dict) -> str:
    s = report["settings"]
    return (f"{s['examples']} examples x {s['noises']} noises = {s['samples']} samples per checkpoint (noise seed "
            f"{s['seed']}, the same for every checkpoint), {s['steps']} ODE steps, guidance {s['guidance']:g}, style "
            f"strength {s['scale']:g}. Intervals: {report['interval']}.")


def headline(report: dict, metric: str = "ocr") -> str:
    """The verdict of the main metric, one line per comparison."""
    rows = [p for p in report["paired"] if p["reward"] == metric]
    return "\n".join(f"{p['b']} vs {p['a']}: {METRIC_LABELS.get(metric, metric)} {p['diff']:+.3f} "
                     f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] — {p['verdict']}" for p in rows)


def write_report(out_dir: str, report: dict, images_of: dict[str, list[Image.Image]], items: list[dict]) -> None:
    from .eval_checkpoints import slug, write_json

    os.makedirs(out_dir, exist_ok=True)
    for c in report["checkpoints"]:
        name, images = c["name"], images_of[c["name"]]
        folder = os.path.join(out_dir, "images", slug(name))
        os.makedirs(folder, exist_ok=True)
        for s, im in zip(c["samples"], images):
            s["image"] = os.path.join("images", slug(name), f"e{s['example']:03d}-n{s['noise']:02d}.png")
            im.save(os.path.join(out_dir, s["image"]))
        c["grid"] = f"grid-{slug(name)}.png"
        with atomic_path(os.path.join(out_dir, c["grid"])) as tmp:
            grid_picture(images, c["samples"]).save(tmp, format="PNG")
    write_json(out_dir, report)
    head, body = _table_rows(report)
    phead, pbody = _paired_rows(report)
    md = ["# Evaluation", "", settings_line(report), "", markdown_table(head, body), "",
          "## Paired comparisons (same samples)", "", markdown_table(phead, pbody) if pbody else "(one checkpoint)", ""]
    for c in report["checkpoints"]:
        md += [f"## {c['name']}", "", f"`{c['path']}`", "", f"![{c['name']}]({c['grid']})", ""]
    write_text(os.path.join(out_dir, "report.md"), "\n".join(md))
    write_text(os.path.join(out_dir, "report.html"), _html(report, head, body, phead, pbody))


def _html_table(head, body) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _html(report, head, body, phead, pbody) -> str:
    parts = ["<!doctype html><meta charset=utf-8><title>Evaluation</title><style>body{font-family:sans-serif}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px}"
             ".grid{display:flex;flex-wrap:wrap;gap:6px}.cell{width:136px;font-size:12px;text-align:center}"
             ".cell img{width:128px;height:128px;image-rendering:pixelated}.ok{color:#070}.bad{color:#a00}</style>",
             "<h1>Evaluation</h1>", f"<p>{html.escape(settings_line(report))}</p>", _html_table(head, body),
             "<h2>Paired comparisons (same samples)</h2>", _html_table(phead, pbody) if pbody else "<p>one checkpoint</p>"]
    for c in report["checkpoints"]:
        parts.append(f"<h2>{html.escape(c['name'])}</h2><p><code>{html.escape(c['path'])}</code></p><div class=grid>")
        for s in c["samples"]:
            cls = "ok" if (s.get("ocr_exact") or 0) >= 1 else "bad"
            parts.append(f"<div class=cell><a href='{html.escape(s['image'])}'><img src='{html.escape(s['image'])}' "
                         f"title='{html.escape(s['text'])}'></a><div class={cls}>{html.escape(caption(s))}</div>"
                         f"<div>target {html.escape(s['text'])}</div></div>")
        parts.append("</div>")
    return "\n".join(parts)
