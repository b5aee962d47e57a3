"""The loss curve as a small PNG, drawn with Pillow (no plotting library needed)."""
from __future__ import annotations

from pathlib import Path

from adapterhub.io import atomic_path

WIDTH, HEIGHT, MARGIN = 640, 360, 48
RAW_COLOUR, EMA_COLOUR, VAL_COLOUR, AXIS_COLOUR = (168, 200, 232), (31, 78, 140), (224, 112, 32), (153, 153, 153)
EMA_BETA = 0.9  # TensorBoard's default smoothing


def ema(values: list[float], beta: float = EMA_BETA) -> list[float]:
    """The exponential moving average, debiased as TensorBoard's (the first value is not pulled to 0)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta ** i))
    return out


def step_ticks(first: int, last: int, most: int = 6) -> list[int]:
    """Round step numbers from ``first`` to ``last`` for the x axis: 1, 2 or 5 times a power of ten apart,
    at most ``most`` of them."""
    span, power = max(last - first, 1), 0
    while True:
        for unit in (1, 2, 5):
            spacing = unit * 10 ** power
            if span // spacing <= most - 1:
                start = -(-first // spacing) * spacing  # the first multiple of spacing at or after first
                return list(range(start, last + 1, spacing))
        power += 1


def loss_png(path: Path, history: list[dict]) -> Path:
    """Raw loss (light), its exponential moving average (dark) and validation loss (orange dots) against
    the step, which the x axis labels."""
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
    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline=AXIS_COLOUR)
    bottom = HEIGHT - MARGIN
    for tick in step_ticks(min(steps), max(steps)):
        x = xy(tick, lo)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill=AXIS_COLOUR)
        draw.text((x - 3 * len(str(tick)), bottom + 6), str(tick), fill="black")
    draw.text((WIDTH // 2 - 12, HEIGHT - 18), "step", fill="black")
    if len(steps) > 1:
        draw.line([xy(s, v) for s, v in zip(steps, loss)], fill=RAW_COLOUR, width=1)
        draw.line([xy(s, v) for s, v in zip(steps, ema(loss))], fill=EMA_COLOUR, width=2)
    for s, v in vals:
        x, y = xy(s, v)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VAL_COLOUR)
    draw.text((MARGIN, 8), f"loss (light), EMA {EMA_BETA} (dark)  min {min(loss):.4g}, last {loss[-1]:.4g}",
              fill="black")
    draw.text((4, MARGIN - 6), f"{hi:.3g}", fill="black")
    draw.text((4, HEIGHT - MARGIN - 6), f"{lo:.3g}", fill="black")
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
