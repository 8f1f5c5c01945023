"""Classical landmarks → face: the mean training face, and the mean face warped to the landmarks.

The warp is piecewise affine (OpenCV): the mean landmarks, with the image's corners and
edge midpoints, are triangulated once (Delaunay); each triangle of the mean face is mapped
by the affine transform that takes its corners to the sample's landmarks. No learning: it
is the average appearance moved to the right shape, what a generator has to beat by
drawing the shape's details.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def _anchors(size: int) -> np.ndarray:
    s = size - 1
    return np.array([[0, 0], [s / 2, 0], [s, 0], [s, s / 2], [s, s], [s / 2, s], [0, s], [0, s / 2]], np.float64)


def triangulate(points: np.ndarray, size: int) -> np.ndarray:
    """Delaunay triangles (T, 3) as indices into ``points`` (N, 2) plus the 8 frame anchors."""
    pts = np.concatenate([points, _anchors(size)])
    subdiv = cv2.Subdiv2D((-1, -1, size + 2, size + 2))
    for p in pts:
        subdiv.insert((float(np.clip(p[0], -0.5, size + 0.5)), float(np.clip(p[1], -0.5, size + 0.5))))
    tris = []
    for t in subdiv.getTriangleList().reshape(-1, 3, 2):
        idx = [int(np.argmin(((pts - v) ** 2).sum(1))) for v in t]
        if len(set(idx)) == 3:
            tris.append(idx)
    return np.array(sorted(set(map(tuple, tris))), np.int64)


def warp_piecewise_affine(image: np.ndarray, src: np.ndarray, dst: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Warp ``image`` (H, W, C) float so that the points ``src`` (N, 2) land on ``dst``; both include
    the frame anchors. Pixels no triangle covers keep ``image``'s value."""
    h, w = image.shape[:2]
    out = image.copy()
    for tri in triangles:
        s, d = src[tri].astype(np.float32), dst[tri].astype(np.float32)
        if abs(np.cross(d[1] - d[0], d[2] - d[0])) < 1e-6:
            continue
        warped = cv2.warpAffine(
            image, cv2.getAffineTransform(s, d), (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        inside = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(inside, np.round(d * 16).astype(np.int32), 1, lineType=cv2.LINE_8, shift=4)
        out[inside > 0] = warped.reshape(h, w, -1)[inside > 0]
    return out


def warped_mean_faces(mean_face: torch.Tensor, mean_points: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """mean_face (C, S, S), mean_points (N, 2) and per-sample landmarks (B, N, 2), pixels → (B, C, S, S)."""
    size = mean_face.shape[-1]
    anchors = _anchors(size)
    src = np.concatenate([mean_points, anchors])
    triangles = triangulate(mean_points, size)
    img = mean_face.detach().float().cpu().permute(1, 2, 0).numpy()
    outs = []
    for p in points.detach().double().cpu().numpy():
        outs.append(warp_piecewise_affine(img, src, np.concatenate([p, anchors]), triangles))
    return torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).to(mean_face.device, mean_face.dtype)
