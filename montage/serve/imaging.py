"""Request images: size limits, decoding with 4xx-worthy errors, compositing helpers."""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np

from montage.platform.imaging import ImageError, decode_image


class RequestError(ValueError):
    """A bad request; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_side: int = 4096
    max_bytes: int = 20 * 1024 * 1024


def decode_upload(data: bytes | None, field: str, limits: Limits, mode: str = "rgb") -> np.ndarray:
    """Bytes of an uploaded image → uint8 array, or a RequestError naming the field."""
    if data is None:
        raise RequestError(f"missing file field '{field}'", 422)
    if len(data) > limits.max_bytes:
        raise RequestError(f"'{field}' is {len(data)} bytes; the limit is {limits.max_bytes}", 413)
    orientation = _check_declared_size(data, field, limits)
    try:
        img = decode_image(data, what=f"'{field}'", mode=mode)
    except ImageError as exc:
        raise RequestError(str(exc)) from exc
    if (
        mode == "unchanged" and orientation > 1
    ):  # OpenCV applies EXIF orientation except in this mode: masks match their photo
        img = _orient(img, orientation)
    h, w = img.shape[:2]
    if max(h, w) > limits.max_side:
        raise RequestError(f"'{field}' is {w}x{h}; the limit is {limits.max_side} px per side", 413)
    if min(h, w) < 1:
        raise RequestError(f"'{field}' has no pixels")
    return img


def _check_declared_size(data: bytes, field: str, limits: Limits) -> int:
    """Refuse an oversized image from its header alone, before decoding allocates it; returns the
    EXIF orientation (1 when none)."""
    orientation = 1
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            try:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block: decode as stored
                orientation = 1
    except (
        Image.DecompressionBombError
    ) as exc:  # the header claims far more pixels than any limit: never hand it to OpenCV
        raise RequestError(
            f"'{field}' claims too many pixels ({exc}); the limit is {limits.max_side} px per side", 413
        ) from exc
    except Exception:  # noqa: BLE001 - not readable by Pillow: OpenCV's decoder reports it
        return 1
    if max(w, h) > limits.max_side:
        raise RequestError(f"'{field}' is {w}x{h}; the limit is {limits.max_side} px per side", 413)
    return orientation if 1 <= orientation <= 8 else 1


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (2..8) the way a viewer (and OpenCV's other modes) shows it."""
    if orientation in (5, 6, 7, 8):
        img = cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE if orientation in (5, 6) else cv2.ROTATE_90_COUNTERCLOCKWISE)
    if orientation in (2, 5, 7):
        img = cv2.flip(img, 1)  # mirrored left-right
    elif orientation == 4:
        img = cv2.flip(img, 0)  # mirrored top-bottom
    elif orientation == 3:
        img = cv2.rotate(img, cv2.ROTATE_180)
    return np.ascontiguousarray(img)


def mask_from_upload(img: np.ndarray) -> np.ndarray:
    """A mask upload (grey, RGB or RGBA) → uint8 (H, W): the alpha channel if any, else grey."""
    if img.ndim == 2:
        return img
    if img.shape[2] == 4:
        return img[..., 3]
    return cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2GRAY)


def refine_alpha(
    alpha: np.ndarray, image: np.ndarray, threshold: float | None = None, refine: bool = False
) -> np.ndarray:
    """Optional edge-aware smoothing of a [0, 1] alpha (joint bilateral-like via the image's
    edges) and an optional hard threshold."""
    a = alpha.astype(np.float32)
    if refine:
        soft = cv2.bilateralFilter(a, d=5, sigmaColor=0.2, sigmaSpace=3)
        edges = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 50, 150) > 0
        a = np.where(edges, a, soft)
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise RequestError(f"threshold must be in [0, 1], got {threshold}")
        a = (a >= threshold).astype(np.float32)
    return np.clip(a, 0, 1)


@dataclass
class Placement:
    """Where the person goes: centre (x, y) as fractions of the background, and the person's
    height as a fraction (``scale``) of the background's height."""

    x: float = 0.5
    y: float = 0.6
    scale: float = 0.7

    def __post_init__(self) -> None:
        if not (0 <= self.x <= 1 and 0 <= self.y <= 1):
            raise RequestError(f"x and y must be in [0, 1], got x={self.x}, y={self.y}")
        if not 0 < self.scale <= 4:
            raise RequestError(f"scale must be in (0, 4], got {self.scale}")


_ROWS = 256  # rows blended at a time: the extra memory of a paste is bounded by the output's width


def paste(
    person: np.ndarray, alpha: np.ndarray, background: np.ndarray, where: Placement
) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-blend the person onto the background at full background resolution.

    Returns (composite RGB uint8, mask uint8 0..255 of the pasted alpha). Pixels the person
    does not cover are the background's own, bit for bit. The work is bounded by the output: an
    enlarged person (scale up to 4 × the background's height) is sampled only where it is visible.
    """
    bh, bw = background.shape[:2]
    ph, pw = person.shape[:2]
    th = max(1, int(round(where.scale * bh)))
    tw = max(1, int(round(pw * th / ph)))
    cx, cy = int(round(where.x * bw)), int(round(where.y * bh))
    x0, y0 = cx - tw // 2, cy - th // 2
    bx0, by0, bx1, by1 = max(0, x0), max(0, y0), min(bw, x0 + tw), min(bh, y0 + th)
    mask = np.zeros((bh, bw), np.uint8)
    comp = background.copy()
    if bx1 <= bx0 or by1 <= by0:
        return comp, mask
    if th <= ph:  # shrinking: the resized person is no larger than the input
        p = cv2.resize(person, (tw, th), interpolation=cv2.INTER_AREA if th < ph else cv2.INTER_LINEAR)
        a = cv2.resize(alpha.astype(np.float32, copy=False), (tw, th), interpolation=cv2.INTER_LINEAR)

        def rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
            ys, xs = slice(by0 - y0 + r0, by0 - y0 + r1), slice(bx0 - x0, bx1 - x0)
            return p[ys, xs].astype(np.float32), np.clip(a[ys, xs], 0, 1)

    else:  # enlarging (scale up to 4): only the visible window is sampled, never the whole enlarged person

        def rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
            return _enlarge_visible(person, alpha, (tw, th), (bx0 - x0, by0 - y0 + r0), (bx1 - bx0, r1 - r0))

    for r0 in range(0, by1 - by0, _ROWS):  # float temporaries for a band of rows at a time
        r1 = min(by1 - by0, r0 + _ROWS)
        sub_p, sub_a = rows(r0, r1)
        out = comp[by0 + r0 : by0 + r1, bx0:bx1]
        blended = (sub_p * sub_a[..., None] + out.astype(np.float32) * (1 - sub_a[..., None])).round().astype(np.uint8)
        m8 = (sub_a * 255).round().astype(np.uint8)
        keep = m8 == 0
        blended[keep] = out[keep]
        out[...] = blended
        mask[by0 + r0 : by0 + r1, bx0:bx1] = m8
    return comp, mask


def _enlarge_visible(
    person: np.ndarray, alpha: np.ndarray, size: tuple[int, int], offset: tuple[int, int], visible: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The ``visible`` (w, h) window at ``offset`` of the person and alpha bilinearly resized to
    ``size``, without making the whole resized image: the same sampling as ``cv2.resize`` (pixel
    centres aligned, edges replicated) as an inverse affine map into the window."""
    (tw, th), (ox, oy), (vw, vh) = size, offset, visible
    ph, pw = person.shape[:2]
    sx, sy = pw / tw, ph / th
    m = np.array([[sx, 0, (ox + 0.5) * sx - 0.5], [0, sy, (oy + 0.5) * sy - 0.5]], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    p = cv2.warpAffine(person, m, (vw, vh), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    a = cv2.warpAffine(alpha.astype(np.float32, copy=False), m, (vw, vh), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    return p.astype(np.float32), np.clip(a, 0, 1)
