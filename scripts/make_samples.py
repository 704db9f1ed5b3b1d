"""Draw the synthetic street scenes in docs/samples (two views of one place, two other places).

They are procedural so the repository ships no third-party pictures; run
`python scripts/make_samples.py` to redraw them (the output is deterministic).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).resolve().parent.parent / "docs" / "samples"
H, W = 480, 640


def street(seed: int, width: int = 900) -> np.ndarray:
    """A wide RGB street panorama: sky, a row of buildings with windows, road and trees."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, width, 3), np.uint8)
    sky = np.linspace(235, 150, H // 2)[:, None, None] * np.array([0.75, 0.85, 1.0])
    img[: H // 2] = sky.astype(np.uint8)
    x = 0
    while x < width:
        bw, bh = int(rng.integers(80, 200)), int(rng.integers(120, 300))
        colour = [int(c) for c in rng.integers(60, 200, 3)]
        top = H * 3 // 4 - bh
        cv2.rectangle(img, (x, top), (x + bw, H * 3 // 4), colour, -1)
        for wy in range(top + 15, H * 3 // 4 - 30, 35):
            for wx in range(x + 10, x + bw - 20, 30):
                lit = rng.random() < 0.4
                cv2.rectangle(img, (wx, wy), (wx + 14, wy + 20),
                              (240, 230, 150) if lit else (40, 50, 70), -1)
        x += bw + int(rng.integers(0, 25))
    img[H * 3 // 4:] = (90, 90, 95)
    cv2.line(img, (0, H * 7 // 8), (width, H * 7 // 8), (230, 230, 230), 4)
    for _ in range(4):
        tx = int(rng.integers(20, width - 20))
        cv2.rectangle(img, (tx - 4, H * 3 // 4 - 60), (tx + 4, H * 3 // 4), (70, 50, 30), -1)
        cv2.circle(img, (tx, H * 3 // 4 - 80), int(rng.integers(25, 45)), (40, 120, 50), -1)
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    place_a, place_b, place_c = street(1), street(2), street(3)
    views = {
        "place_a_view1.jpg": place_a[:, 0:W],
        "place_a_view2.jpg": np.clip(place_a[:, 60:60 + W] * 0.85 + 10, 0, 255).astype(np.uint8),
        "place_b.jpg": place_b[:, 100:100 + W],
    }
    for name, rgb in views.items():
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(OUT / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 88])
    gray = cv2.cvtColor(place_c[:, 200:200 + W], cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(OUT / "place_c_gray.png"), cv2.resize(gray, (320, 240), cv2.INTER_AREA))


if __name__ == "__main__":
    main()
