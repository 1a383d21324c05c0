"""Small synthetic videos for tests (OpenCV, which vLLM's video loader uses too)."""

from __future__ import annotations

import base64
import os
import tempfile


def moving_circle_mp4(frames: int = 16, size: tuple[int, int] = (96, 96), fps: int = 8,
                      color: tuple[int, int, int] = (0, 0, 255)) -> bytes:
    """An MPEG-4 clip of a circle moving left to right on a light background."""
    import cv2
    import numpy as np

    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        for i in range(frames):
            frame = np.full((size[1], size[0], 3), 235, np.uint8)
            cv2.circle(frame, (16 + i * (size[0] - 32) // max(frames - 1, 1), size[1] // 2), size[1] // 6, color, -1)
            writer.write(frame)
        writer.release()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.remove(path)


def video_data_uri(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()
