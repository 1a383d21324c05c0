"""Synthetic demo datasets: one coloured shape per image; deterministic from a seed.

    vlora-train demo-data --task colors --out data/colors --seed 0

Tasks: `colors` ("What color is the shape?" -> "red") and `shapes` ("What shape is this?" -> "circle").
Each task directory gets `train.jsonl`, `val.jsonl` and `images/`, in the project's chat format.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from artifacts.atomic import atomic_dir

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 20),
    "purple": (140, 40, 180), "orange": (250, 140, 20), "black": (20, 20, 20), "cyan": (30, 200, 220),
}
SHAPES = ["circle", "square", "triangle", "cross", "star"]
QUESTIONS = {"colors": "What color is the shape?", "shapes": "What shape is this?"}
IMAGE_SIZE = 128


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 20) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        pts = [(0, -1), (0.866, 0.5), (-0.866, 0.5)]
    elif shape == "square":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif shape == "star":
        pts = [((1 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5),
                -(1 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    elif shape == "cross":
        a, b = 0.3, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(shape)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts]


def draw_sample(color: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    background = _jitter((235, 235, 235), rng, 15)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.28, 0.38) * size
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    fill = _jitter(COLORS[color], rng)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        angle = rng.uniform(-0.15, 0.15)
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    return image


def make_demo_dataset(task: str, out: str | Path, seed: int = 0, n_train: int = 800, n_val: int = 200,
                      overwrite: bool = False, image_size: int = IMAGE_SIZE) -> Path:
    if task not in QUESTIONS:
        raise ValueError(f"unknown demo task '{task}'; choose one of {sorted(QUESTIONS)}")
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        rng = random.Random(f"{task}-{seed}")
        for split, count in (("train", n_train), ("val", n_val)):
            with open(tmp / f"{split}.jsonl", "w") as f:
                for i in range(count):
                    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
                    name = f"images/{split}-{i:05d}.png"
                    draw_sample(color, shape, rng, image_size).save(tmp / name)
                    answer = color if task == "colors" else shape
                    record = {"messages": [
                        {"role": "user", "content": [{"type": "image", "image": name},
                                                     {"type": "text", "text": QUESTIONS[task]}]},
                        {"role": "assistant", "content": answer},
                    ]}
                    f.write(json.dumps(record) + "\n")
    return Path(out)
