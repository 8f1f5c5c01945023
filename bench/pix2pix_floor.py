"""The L1 floor of synthetic pix2pix: what no landmark-conditioned generator can predict.

    python bench/pix2pix_floor.py

The synthetic faces' colours are drawn at random per sample, independently of the landmarks.
The best L1 from the landmarks alone is (about) the face drawn through the true landmarks
with the mean colours; printed as a ratio of the mean training face's L1, measured in the
same run on the tiny recipe's validation set (128 faces at 64 px, data seed 0: val seed 1).
"""

from __future__ import annotations

import sys

import numpy as np

from montage.tasks.pix2pix.data import draw_face, synthetic_landmarks


class MeanColours:
    """Stands in for the generator's rng after the landmarks: every colour draw is its mean."""

    def normal(self, loc: float, scale: float, size: int | None = None) -> np.ndarray:
        return np.zeros(size)


def faces(seed: int, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    real, mean_colour = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        pts = synthetic_landmarks(rng, size)
        real.append(draw_face(pts, size, rng).astype(np.float32) / 255)
        mean_colour.append(draw_face(pts, size, MeanColours()).astype(np.float32) / 255)  # type: ignore[arg-type]
    return np.stack(real), np.stack(mean_colour)


def main() -> int:
    size = 64
    train, _ = faces(0, 512, size)
    val, oracle = faces(1, 128, size)
    mean_face = train.mean(0)
    l1_mean = float(np.abs(val - mean_face).mean())
    l1_oracle = float(np.abs(val - oracle).mean())
    ratio = l1_oracle / l1_mean
    print(f"mean face L1 {l1_mean:.4f}; true landmarks + mean colours L1 {l1_oracle:.4f} = {ratio:.3f}× mean face")
    return 0


if __name__ == "__main__":
    sys.exit(main())
