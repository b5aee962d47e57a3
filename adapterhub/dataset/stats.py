"""Tag frequencies (images per tag, lower-cased as kohya's ``ss_tag_frequency``) and a bar chart."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from statistics import mean

from PIL import Image, ImageDraw, ImageFont

from adapterhub.dataset.config import StatsConfig
from adapterhub.dataset.folder import STATE_DIR, Dataset, norm_tag, scan
from adapterhub.io import atomic_path


def tag_stats(cfg: StatsConfig, ds: Dataset | None = None) -> dict:
    ds = ds or scan(cfg.dir, cfg.ext)
    overall, per_folder, lengths = Counter(), {}, []
    captioned = non_utf8 = 0
    for item in ds.items:
        cap = item.caption()
        if not cap.exists or not cap.text.strip():
            continue
        captioned += 1
        non_utf8 += cap.encoding != "utf-8"
        tags = {norm_tag(t) for t in cap.tags}
        lengths.append(len(cap.tags))
        overall.update(tags)
        folder = Path(item.subset.rel).name or ds.root.resolve().name
        per_folder.setdefault(folder, Counter()).update(tags)
    n = len(ds.items)
    rows = [{"tag": t, "images": c, "share": f"{100 * c / max(captioned, 1):.0f}%"}
            for t, c in sorted(overall.items(), key=lambda kv: (-kv[1], kv[0]))[:cfg.top]]
    result = {"images": n, "captioned": captioned, "uncaptioned": n - captioned, "non_utf8": non_utf8,
              "distinct_tags": len(overall), "mean_tags": round(mean(lengths), 2) if lengths else 0,
              "folders": [{"folder": s.rel or ".", "repeats": s.repeats, "class_tokens": s.class_tokens}
                          for s in ds.subsets.values()],
              "top": rows, "ss_tag_frequency": {k: dict(v) for k, v in per_folder.items()}}
    if not cfg.no_chart and rows:
        chart = Path(cfg.chart) if cfg.chart else Path(cfg.dir, STATE_DIR, "tag_frequency.png")
        write_chart(rows, chart, title=f"tag frequency - {captioned} captioned images")
        result["chart"] = str(chart)
    return result


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def write_chart(rows: list[dict], path: Path, title: str = "") -> Path:
    """A horizontal bar chart PNG: one bar per tag, longest first."""
    font, bar_h, gap, pad = _font(14), 18, 6, 12
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(probe.textlength(r["tag"], font=font) for r in rows) + 10
    width, plot_w = int(label_w) + 520, 440
    height = pad * 2 + 24 + len(rows) * (bar_h + gap)
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    draw.text((pad, pad), title, fill="black", font=font)
    top = max(r["images"] for r in rows)
    for i, r in enumerate(rows):
        y = pad + 24 + i * (bar_h + gap)
        draw.text((pad, y + 1), r["tag"], fill="black", font=font)
        x0 = pad + label_w
        draw.rectangle([x0, y, x0 + max(2, plot_w * r["images"] / top), y + bar_h], fill=(66, 118, 200))
        draw.text((x0 + plot_w * r["images"] / top + 6, y + 1), str(r["images"]), fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        im.save(tmp, format="PNG")
    return path
