"""The loss curve as a small PNG, drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

from pathlib import Path

from adapterhub.io import atomic_path

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_png(path: Path, history: list[dict]) -> Path:
    """Raw loss (light), its moving average (dark) and validation loss (orange dots) against the step."""
    from PIL import Image, ImageDraw

    steps = [r["step"] for r in history]
    loss = [r["loss"] for r in history]
    vals = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    ys = loss + [v for _, v in vals]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1e-9
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(step, value):
        x = MARGIN + (step - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)
        y = HEIGHT - MARGIN - (value - lo) / (hi - lo) * (HEIGHT - 2 * MARGIN)
        return x, y

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="#999999")
    if len(steps) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, loss)], fill="#a8c8e8", width=1)
        smooth = _smooth(loss, max(1, len(loss) // 20))
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill="#1f4e8c", width=2)
    for s, v in vals:
        x, y = xy(s, v)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#e07020")
    draw.text((MARGIN, 8), f"loss  (steps {x0}-{max(steps)}, min {min(loss):.4g}, last {loss[-1]:.4g})", fill="black")
    draw.text((4, MARGIN - 6), f"{hi:.3g}", fill="black")
    draw.text((4, HEIGHT - MARGIN - 6), f"{lo:.3g}", fill="black")
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
