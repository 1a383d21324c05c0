"""Synthetic test images and data URIs."""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw


def shape_image(color: str = "red", size: tuple[int, int] = (256, 256), shape: str = "circle") -> Image.Image:
    image = Image.new("RGB", size, "white")
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def image_message(url: str, text: str = "What color is the shape?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]
