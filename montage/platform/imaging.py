"""Image I/O and geometry shared by tasks and the server: decoding with clear errors,
aspect-preserving resize + pad to a model's size, exact restore, sample grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch  # imported where a grid is drawn: Serve's ingress decodes and encodes images without torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image is missing, unreadable, corrupt or of the wrong shape."""


def decode_image(data: bytes, what: str = "image", mode: str = "rgb") -> np.ndarray:
    """Decode encoded bytes (PNG/JPEG/...) → uint8 array.

    ``mode``: ``rgb`` (H, W, 3), ``gray`` (H, W), ``unchanged`` (as stored, BGR(A) → RGB(A)).
    """
    if not data:
        raise ImageError(f"{what} is empty")
    flag = {"rgb": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE, "unchanged": cv2.IMREAD_UNCHANGED}[mode]
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if arr is None or arr.size == 0:
        raise ImageError(f"{what} is not a decodable image (corrupt, truncated or unsupported format)")
    if arr.dtype != np.uint8:  # 16-bit PNGs
        arr = (arr / 257).astype(np.uint8) if arr.dtype == np.uint16 else arr.astype(np.uint8)
    if arr.ndim == 3:
        code = cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
        arr = cv2.cvtColor(arr, code)
    return arr


def read_image(path: str | Path, mode: str = "rgb") -> np.ndarray:
    """Read an image file, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        return decode_image(path.read_bytes(), what=str(path), mode=mode)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{path}: cannot decode: {exc}") from exc


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file → uint8 (H, W) in 0..255: the alpha channel of an RGBA PNG, else the grey level."""
    arr = read_image(path, mode="unchanged")
    if arr.ndim == 3:
        arr = arr[..., 3] if arr.shape[2] == 4 else cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)
    return arr


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA → PNG bytes."""
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA if arr.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(arr: np.ndarray, quality: int = 92) -> bytes:
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


def write_image(path: str | Path, arr: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_jpeg(arr) if path.suffix.lower() in (".jpg", ".jpeg") else encode_png(arr)
    path.write_bytes(data)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


# ----------------------------------------------------------------------- letterbox


@dataclass(frozen=True)
class Letterbox:
    """How an (h, w) image was resized by ``scale`` and padded to ``size``×``size``."""

    h: int
    w: int
    size: int
    scale: float
    top: int
    left: int

    @property
    def inner(self) -> tuple[int, int]:
        """(height, width) of the resized image inside the padded square."""
        return max(1, round(self.h * self.scale)), max(1, round(self.w * self.scale))


def letterbox_geometry(h: int, w: int, size: int) -> Letterbox:
    scale = size / max(h, w)
    ih, iw = max(1, round(h * scale)), max(1, round(w * scale))
    return Letterbox(h, w, size, scale, (size - ih) // 2, (size - iw) // 2)


def letterbox(
    img: np.ndarray, size: int, interpolation: int = cv2.INTER_AREA, fill: int = 0
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect so the long side is ``size``, pad (centred) to size×size."""
    h, w = img.shape[:2]
    box = letterbox_geometry(h, w, size)
    ih, iw = box.inner
    interp = interpolation if box.scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(img, (iw, ih), interpolation=interp)
    out = np.full((size, size) + img.shape[2:], fill, dtype=img.dtype)
    out[box.top : box.top + ih, box.left : box.left + iw] = resized.reshape((ih, iw) + img.shape[2:])
    return out, box


def restore(arr: np.ndarray, box: Letterbox, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Crop the padding off a model-size output and resize it back to the original (h, w)."""
    ih, iw = box.inner
    crop = np.ascontiguousarray(arr[box.top : box.top + ih, box.left : box.left + iw])
    out = cv2.resize(crop, (box.w, box.h), interpolation=interpolation)
    return out.reshape((box.h, box.w) + arr.shape[2:])


# ---------------------------------------------------------------------------- grids


def to_uint8_image(t: torch.Tensor) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) float in [0, 1] with C in {1, 3} → 3-channel uint8."""
    import torch

    t = t.detach().float().clamp(0, 1)
    if t.shape[-3] == 1:
        t = t.expand(*t.shape[:-3], 3, *t.shape[-2:])
    return (t[..., :3, :, :] * 255).round().to(torch.uint8)


def image_grid(columns: Sequence[torch.Tensor], max_rows: int = 4, pad: int = 2) -> np.ndarray:
    """One row per sample, one column per tensor (each (B, C, H, W) in [0, 1]) → HxWx3 uint8.

    Tiles on a white background with ``pad`` pixels around and between them, as torchvision's
    ``make_grid(..., pad_value=255)`` lays them out; done in numpy because a training worker would
    otherwise import torchvision (~2.4 s of CPU, for ``torch._dynamo``) only to log its samples.
    """
    n = min(max_rows, columns[0].shape[0])
    tiles = [to_uint8_image(col[i].cpu()).permute(1, 2, 0).numpy() for i in range(n) for col in columns]
    if len(tiles) == 1:
        return tiles[0]
    h, w = tiles[0].shape[:2]
    cols = min(len(columns), len(tiles))
    rows = -(-len(tiles) // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        row, col = divmod(k, cols)
        top, left = pad + row * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = tile
    return grid
