import base64
import io
import json
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from montage.platform.imaging import ImageError, image_grid, letterbox, restore, to_uint8_image
from montage.platform.masks import CocoPersons, ImageMaskFolder, SuperviselyPersons, SyntheticPersons
from montage.tasks.segmentation.data import SegDataConfig, SegmentationDataset, build_datasets


def _write_rgb(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return img


@pytest.fixture
def coco(tmp_path: Path):
    h, w = 24, 32
    for i in (1, 2, 3):
        _write_rgb(tmp_path / "img" / f"{i}.png", h, w, seed=i)
    poly = [4.0, 3.0, 14.0, 3.0, 14.0, 12.0, 4.0, 12.0]
    rle_mask = np.zeros((h, w), np.uint8)
    rle_mask[15:20, 20:30] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:6, 24:32] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    ann = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [poly],
                "iscrowd": 0,
                "area": 90.0,
                "bbox": [4, 3, 10, 9],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "segmentation": rle,
                "iscrowd": 0,
                "area": 50.0,
                "bbox": [20, 15, 10, 5],
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 1,
                "segmentation": crowd_rle,
                "iscrowd": 1,
                "area": 48.0,
                "bbox": [24, 0, 8, 6],
            },
            {
                "id": 4,
                "image_id": 2,
                "category_id": 18,
                "segmentation": [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]],
                "iscrowd": 0,
                "area": 30.0,
                "bbox": [1, 1, 8, 8],
            },
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))
    expected_poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w)))
    return tmp_path, path, expected_poly | rle_mask, crowd


def test_coco_person_union_rle_polygon_and_crowd(coco) -> None:
    root, ann, expected, crowd = coco
    src = CocoPersons(str(root / "img"), str(ann))
    assert len(src) == 1  # image 2 has only a dog, image 3 nothing
    image, alpha, valid = src.load(0)
    assert image.shape == (24, 32, 3)
    np.testing.assert_array_equal(alpha, expected * 255)
    np.testing.assert_array_equal(valid, 1 - crowd)  # crowd ignored
    assert expected.sum() > 100  # polygon + RLE really drawn


def test_coco_crowd_modes_and_negatives(coco) -> None:
    root, ann, expected, crowd = coco
    fg = CocoPersons(str(root / "img"), str(ann), crowd="foreground")
    _, alpha, valid = fg.load(0)
    np.testing.assert_array_equal(alpha, (expected | crowd) * 255)
    assert valid.all()
    neg = CocoPersons(str(root / "img"), str(ann), keep_negatives=True)
    assert len(neg) == 3
    _, alpha2, _ = neg.load(1)  # the dog image: a negative
    assert alpha2.sum() == 0


def test_coco_missing_image_names_the_file(coco, tmp_path: Path) -> None:
    root, ann, _, _ = coco
    (root / "img" / "1.png").unlink()
    ds = SegmentationDataset(CocoPersons(str(root / "img"), str(ann)), size=32)
    with pytest.raises(ImageError, match="1.png"):
        ds[0]


def _sly_bitmap(mask: np.ndarray) -> str:
    """Encode like Supervisely: palette PNG (transparency 0) → zlib → base64."""
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0, optimize=0)
    return base64.b64encode(zlib.compress(buf.getvalue())).decode()


def test_supervisely_bitmap_and_polygon_with_hole(tmp_path: Path) -> None:
    h, w = 40, 50
    proj = tmp_path / "persons"
    _write_rgb(proj / "ds1" / "img" / "a.png", h, w)
    bmp = np.zeros((6, 8), np.uint8)
    bmp[1:5, 2:7] = 1
    ann = {
        "size": {"height": h, "width": w},
        "objects": [
            {
                "classTitle": "person_bmp",
                "geometryType": "bitmap",
                "bitmap": {"data": _sly_bitmap(bmp), "origin": [30, 25]},
            },
            {
                "classTitle": "person_poly",
                "geometryType": "polygon",
                "points": {
                    "exterior": [[2, 2], [20, 2], [20, 20], [2, 20]],
                    "interior": [[[8, 8], [14, 8], [14, 14], [8, 14]]],
                },
            },
            {
                "classTitle": "car",
                "geometryType": "polygon",
                "points": {"exterior": [[40, 2], [48, 2], [48, 10]], "interior": []},
            },
        ],
    }
    (proj / "ds1" / "ann").mkdir(parents=True)
    (proj / "ds1" / "ann" / "a.png.json").write_text(json.dumps(ann))
    src = SuperviselyPersons(str(proj))
    image, alpha, _ = src.load(0)
    m = alpha > 0
    np.testing.assert_array_equal(m[25:31, 30:38], bmp.astype(bool))  # bitmap placed at origin (x=30, y=25)
    assert m[3, 3] and m[19, 19] and m[5, 10]  # polygon ring
    assert not m[11, 11]  # the hole
    assert not m[4, 45]  # not a person class
    assert m.sum() == bmp.sum() + (19 * 19 - 7 * 7)  # exterior and hole both include their boundary pixels


def test_folder_source_and_bad_image(tmp_path: Path) -> None:
    _write_rgb(tmp_path / "images" / "x.jpg", 20, 30)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:15, 10:20] = 255
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "masks" / "x.png"), mask)
    (tmp_path / "images" / "y.png").write_bytes(b"not a png at all")
    cv2.imwrite(str(tmp_path / "masks" / "y.png"), mask)
    src = ImageMaskFolder(str(tmp_path / "images"), str(tmp_path / "masks"))
    _, alpha, _ = src.load(0)
    np.testing.assert_array_equal(alpha, mask)
    strict = SegmentationDataset(src, size=32)
    with pytest.raises(ImageError, match="y.png"):
        strict[1]
    lenient = SegmentationDataset(src, size=32, on_error="skip")
    sample = lenient[1]  # falls over to the next good sample
    assert sample["image"].shape == (3, 32, 32)


def test_folder_requires_masks(tmp_path: Path) -> None:
    _write_rgb(tmp_path / "images" / "x.png", 8, 8)
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="without a mask"):
        ImageMaskFolder(str(tmp_path / "images"), str(tmp_path / "masks"))


def test_synthetic_is_seeded_and_batches_are_well_formed() -> None:
    a, b = SyntheticPersons(4, 64, seed=3), SyntheticPersons(4, 64, seed=3)
    np.testing.assert_array_equal(a.load(2)[0], b.load(2)[0])
    assert not np.array_equal(a.load(1)[1], a.load(2)[1])
    frac = a.load(0)[1].mean() / 255
    assert 0.03 < frac < 0.6  # a person, not empty, not everything
    train, val = build_datasets(SegDataConfig(size=64, synthetic_train=8, synthetic_val=4))
    s = train[0]
    assert s["image"].shape == (3, 64, 64) and s["mask"].shape == (1, 64, 64)
    assert 0 <= float(s["mask"].min()) and float(s["mask"].max()) <= 1
    assert len(val) == 4


def test_letterbox_restores_exact_size() -> None:
    yy, xx = np.mgrid[0:37, 0:81]
    img = np.dstack([xx * 3, yy * 6, xx + yy]).astype(np.uint8)  # smooth: survives resampling
    padded, box = letterbox(img, 64)
    assert padded.shape == (64, 64, 3)
    assert padded[: box.top].sum() == 0  # centred padding above
    back = restore(padded, box)
    assert back.shape == img.shape
    assert np.abs(back.astype(int) - img.astype(int)).mean() < 3  # same picture, resampled


@pytest.mark.parametrize("batch,columns,max_rows,pad", [(5, 4, 4, 2), (3, 3, 4, 2), (1, 1, 4, 2), (2, 1, 4, 0)])
def test_sample_grids_are_laid_out_as_torchvisions_make_grid(batch: int, columns: int, max_rows: int, pad: int) -> None:
    from torchvision.utils import make_grid

    g = torch.Generator().manual_seed(batch)
    cols = [torch.rand(batch, 1 if c == 1 else 3, 6, 5, generator=g) for c in range(columns)]
    tiles = [to_uint8_image(col[i]) for i in range(min(max_rows, batch)) for col in cols]
    want = make_grid(torch.stack(tiles), nrow=columns, padding=pad, pad_value=255).permute(1, 2, 0).numpy()
    got = image_grid(cols, max_rows=max_rows, pad=pad)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)
