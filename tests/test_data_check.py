"""`montage data check` on tiny datasets of the real layouts (COCO, Supervisely, iHarmony4, CatFLW,
aligned pairs), the dataset fingerprint, and clear errors for bad input. Ray-free."""

from __future__ import annotations

import base64
import io
import json
import logging
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from montage.cli import main


def _rgb(path: Path, h: int, w: int, seed: int = 0) -> None:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def _check(tmp_path: Path, task: str, *args: str) -> tuple[int, dict]:
    out = tmp_path / f"check-{task}"
    rc = main(["data", "check", task, "--out", str(out), *args])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    return rc, report


def _reasons(report: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in report["rejected"]:
        out.setdefault(r["reason"], []).append(Path(r["name"]).name)
    return out


# ------------------------------------------------------------------------------------ COCO


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def _coco(tmp_path: Path) -> tuple[Path, Path]:
    h, w = 24, 32
    root = tmp_path / "coco" / "img"
    for i in (1, 5, 6):
        _rgb(root / f"{i}.png", h, w, seed=i)
    _rgb(root / "3.png", h + 4, w, seed=3)  # the JSON says 24x32
    body = np.zeros((h, w), np.uint8)
    body[15:20, 20:30] = 1
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:6, 24:32] = 1
    images = [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i in (1, 2, 3, 5, 6)]
    images.append({"id": 4, "file_name": "1.png", "height": h, "width": w})  # the same file listed twice
    poly = [[4.0, 3.0, 14.0, 3.0, 14.0, 12.0, 4.0, 12.0]]

    def ann(k: int, img: int, seg, crowd_flag: int = 0) -> dict:
        return {"id": k, "image_id": img, "category_id": 1, "segmentation": seg, "iscrowd": crowd_flag, "area": 1.0}

    anns = [
        ann(1, 1, poly),  # polygon
        ann(2, 1, _rle(body)),  # RLE
        ann(3, 1, _rle(crowd), 1),  # crowd
        ann(4, 2, poly),  # 2.png is not on disk
        ann(5, 3, poly),
        ann(6, 4, poly),
        ann(7, 5, [[100.0, 100.0, 110.0, 100.0, 110.0, 110.0]]),  # outside the image: an empty mask
        ann(8, 6, _rle(body)),
    ]
    path = tmp_path / "coco" / "instances.json"
    path.write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "person"}], "annotations": anns}))
    return root, path


def test_coco_check_sorts_rejections_by_reason_and_exits_past_the_threshold(tmp_path: Path) -> None:
    root, ann = _coco(tmp_path)
    args = ["data.source=coco", f"data.images={root}", f"data.annotations={ann}", "data.size=32", "--workers", "0"]
    rc, report = _check(tmp_path, "segmentation", *args)
    assert rc == 1 and not report["passed"]
    assert list(report["splits"]) == ["all"]  # no val paths: val is held out of the same source
    split = report["splits"]["all"]
    assert (split["samples"], split["ok"], split["rejected"]) == (6, 2, 4)
    assert _reasons(report) == {
        "missing_file": ["2.png"],
        "size_mismatch": ["3.png"],
        "duplicate": ["1.png"],
        "empty_mask": ["5.png"],
    }
    assert split["common_sizes"] == {"32x24": 2}
    fg = split["foreground"]  # 1.png: polygon 10x9 + RLE 5x10 (crowd not foreground) of 768 px; 6.png: RLE 50 px
    assert fg["max"] == pytest.approx((90 + 50) / 768, abs=0.02) and fg["min"] == pytest.approx(50 / 768, abs=0.01)
    assert (tmp_path / "check-segmentation" / "samples_all.png").is_file()
    rc, report = _check(tmp_path, "segmentation", *args, "--threshold", "0.7", "--grid", "0")
    assert rc == 0 and report["passed"]


def test_bad_input_is_one_clear_line(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="montage")
    missing = tmp_path / "nowhere"
    assert main(["data", "check", "segmentation", "data.source=folder", f"data.images={missing}", "data.masks=x"]) == 2
    assert str(missing) in caplog.text
    bad = tmp_path / "instances.json"
    bad.write_text("{not json")
    assert (
        main(
            ["data", "check", "segmentation", "data.source=coco", f"data.images={tmp_path}", f"data.annotations={bad}"]
        )
        == 2
    )
    assert str(bad) in caplog.text and "not a COCO instances file" in caplog.text
    caplog.clear()
    assert (
        main(
            [
                "data",
                "check",
                "harmonization",
                "data.source=iharmony4",
                f"data.root={tmp_path}",
                "data.subsets=[HFlick]",
            ]
        )
        == 2
    )
    assert "HFlick" in caplog.text and "HFlickr" in caplog.text  # the unknown name and the valid ones


# ------------------------------------------------------------------------------ Supervisely


def _sly_bitmap(mask: np.ndarray) -> str:
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return base64.b64encode(zlib.compress(buf.getvalue())).decode()


def test_supervisely_check_with_loader_workers(tmp_path: Path) -> None:
    ds = tmp_path / "sly" / "ds1"
    h, w = 20, 24
    size = {"height": h, "width": w}
    blob = np.zeros((6, 5), np.uint8)
    blob[1:5, 1:4] = 1
    bitmap = {
        "classTitle": "person_bmp",
        "geometryType": "bitmap",
        "bitmap": {"data": _sly_bitmap(blob), "origin": [3, 2]},
    }
    polygon = {
        "classTitle": "person_poly",
        "geometryType": "polygon",
        "points": {
            "exterior": [[2, 2], [20, 2], [20, 16], [2, 16]],
            "interior": [[[8, 6], [14, 6], [14, 12], [8, 12]]],
        },
    }
    car = {
        "classTitle": "car",
        "geometryType": "polygon",
        "points": {"exterior": [[1, 1], [9, 1], [9, 9]], "interior": []},
    }
    anns = {"a": [bitmap], "b": [polygon], "d": [car], "e": [polygon]}
    (ds / "ann").mkdir(parents=True)
    for name, objects in anns.items():
        (ds / "ann" / f"{name}.png.json").write_text(json.dumps({"size": size, "objects": objects}))
    (ds / "ann" / "c.png.json").write_text("{broken")
    for name in "abcd":  # e.png: its annotation points at a missing image
        _rgb(ds / "img" / f"{name}.png", h, w)
    rc, report = _check(
        tmp_path, "segmentation", "data.source=supervisely", f"data.images={tmp_path / 'sly'}", "--workers", "2"
    )
    assert rc == 1
    assert _reasons(report) == {"bad_annotation": ["c.png"], "empty_mask": ["d.png"], "missing_file": ["e.png"]}
    fg = report["splits"]["all"]["foreground"]
    assert fg["min"] == pytest.approx(12 / 480) and fg["max"] == pytest.approx((19 * 15 - 7 * 7) / 480, abs=0.02)
    assert report["workers"] == 2 and report["samples"] == 5


# -------------------------------------------------------------------------------- iHarmony4


def test_iharmony4_check_and_a_missing_list_file(tmp_path: Path, caplog) -> None:
    sub = tmp_path / "ih" / "HFlickr"
    for name, (h, w) in {"a": (16, 20), "b": (16, 20), "c": (16, 20)}.items():
        _rgb(sub / "real_images" / f"{name}.jpg", h, w)
        _rgb(sub / "composite_images" / f"{name}_1_1.jpg", h, w, seed=1)
        m = np.zeros((h, w), np.uint8)
        m[4:12, 5:15] = 255
        if name == "b":
            m = np.zeros((h + 2, w), np.uint8)  # mask of another size
        (sub / "masks").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sub / "masks" / f"{name}_1.png"), m)
    (sub / "composite_images" / "c_1_1.jpg").unlink()
    (sub / "HFlickr_train.txt").write_text("a_1_1.jpg\nb_1_1.jpg\nc_1_1.jpg\n")
    (sub / "HFlickr_test.txt").write_text("composite_images/a_1_1.jpg\n")
    common = ["data.source=iharmony4", f"data.root={tmp_path / 'ih'}", "data.subsets=[HFlickr]", "data.size=32"]
    rc, report = _check(tmp_path, "harmonization", *common, "--workers", "0")
    assert rc == 1
    assert {k: (v["samples"], v["ok"]) for k, v in report["splits"].items()} == {"train": (3, 1), "val": (1, 1)}
    assert _reasons(report) == {"size_mismatch": ["b_1_1.jpg"], "missing_file": ["c_1_1.jpg"]}
    assert report["splits"]["val"]["foreground"]["median"] == pytest.approx(80 / 320)
    caplog.set_level(logging.ERROR, logger="montage")
    assert main(["data", "check", "harmonization", *common[:2], "data.subsets=[HCOCO]"]) == 2
    assert str(tmp_path / "ih" / "HCOCO" / "HCOCO_train.txt") in caplog.text


# ------------------------------------------------------------------------ CatFLW and aligned


def _catflw(src: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        _rgb(src / "images" / f"cat{i}.png", 80, 80, seed=i)
        pts = rng.uniform(25, 55, (48, 2)).round(1).tolist()
        (src / "labels").mkdir(parents=True, exist_ok=True)
        (src / "labels" / f"cat{i}.json").write_text(json.dumps({"labels": pts, "bounding_boxes": [20, 20, 60, 60]}))
    (src / "labels" / "cat2.json").write_text("{")  # malformed
    _rgb(src / "images" / "cat3.png", 80, 80)  # no annotation


def test_catflw_raw_and_prepared_aligned_pairs(tmp_path: Path) -> None:
    from montage.tasks.pix2pix.data import prepare_catflw

    src = tmp_path / "catflw"
    _catflw(src)
    rc, report = _check(
        tmp_path, "pix2pix", "data.source=aligned", f"data.root={src}", "data.size=32", "--workers", "0"
    )
    raw_fg = report["splits"]["catflw"]["foreground"]
    assert rc == 1 and list(report["splits"]) == ["catflw"]
    assert _reasons(report) == {"bad_annotation": ["cat2.png", "cat3.png"]}
    prepared = tmp_path / "prepared"
    prepare_catflw(src, prepared, size=32)
    (prepared / "train" / "B" / "cat1.png").unlink()
    rc, report = _check(
        tmp_path, "pix2pix", "data.source=aligned", f"data.root={prepared}", "data.size=32", "--workers", "0"
    )
    assert report["splits"]["train"]["samples"] == 2 and _reasons(report) == {"missing_file": ["cat1.png"]}
    # the prepared heatmap (A, a PNG) of cat0 covers what the raw check rendered for cat0 or cat1
    assert raw_fg["min"] - 0.01 <= report["splits"]["train"]["foreground"]["median"] <= raw_fg["max"] + 0.01


# ------------------------------------------------------------------------------ fingerprint


def test_fingerprint_tells_data_apart_cheaply(tmp_path: Path) -> None:
    import os

    from montage.platform.fingerprint import fingerprint
    from montage.tasks.segmentation.data import SegDataConfig

    for i in range(3):
        _rgb(tmp_path / "img" / f"{i}.png", 8, 8, seed=i)
        _rgb(tmp_path / "mask" / f"{i}.png", 8, 8, seed=i)
    cfg = SegDataConfig(source="folder", images=str(tmp_path / "img"), masks=str(tmp_path / "mask"))
    a = fingerprint(cfg, {"train": 3})
    assert a.files == 6 and set(a.roots) == {"images", "masks"} and a.digest == fingerprint(cfg).digest
    f = tmp_path / "img" / "1.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, a newer file
    assert fingerprint(cfg).digest != a.digest
    syn = [fingerprint(SegDataConfig(seed=s)).digest for s in (0, 0, 1)]
    assert syn[0] == syn[1] != syn[2] and fingerprint(SegDataConfig()).files == 0


# ------------------------------------------------------- every generated source end to end


@pytest.mark.parametrize("task", ["segmentation", "harmonization", "pix2pix"])
def test_synthetic_source_of_every_task_passes_with_nothing_rejected(tmp_path: Path, task: str) -> None:
    rc, report = _check(
        tmp_path, task, "data.size=32", "data.synthetic_train=4", "data.synthetic_val=2", "--workers", "0"
    )
    assert report["rejected"] == [] and rc == 0
    assert {k: (v["samples"], v["ok"]) for k, v in report["splits"].items()} == {"train": (4, 4), "val": (2, 2)}
    assert all(0 < v["foreground"]["median"] < 1 for v in report["splits"].values())
    assert (tmp_path / f"check-{task}" / "samples_train.png").is_file()


def test_cutouts_check_reads_every_cutout_and_background_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        rgba = np.zeros((20, 10, 4), np.uint8)
        rgba[..., :3] = rng.integers(0, 255, (20, 10, 3))
        rgba[4:16, 2:8, 3] = 255
        (tmp_path / "cut").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "cut" / f"{name}.png"), rgba)
    for name in ("x", "y", "z"):
        _rgb(tmp_path / "bg" / f"{name}.jpg", 40, 50, seed=ord(name))
    common = ["data.source=cutouts", f"data.root={tmp_path / 'cut'}", f"data.backgrounds={tmp_path / 'bg'}"]
    rc, report = _check(tmp_path, "harmonization", *common, "data.size=32", "--workers", "0")
    assert report["rejected"] == [] and rc == 0
    assert report["splits"]["all"]["samples"] == 3 and report["splits"]["all"]["common_sizes"] == {"50x40": 3}
    cv2.imwrite(str(tmp_path / "cut" / "b.png"), rgba[..., :3])  # no alpha channel
    rc, report = _check(tmp_path, "harmonization", *common, "data.size=32", "--workers", "0")
    assert rc == 1 and sorted(r["name"].split(" on ")[0] for r in report["rejected"]) == [
        str(tmp_path / "cut" / "b.png")
    ]


def test_harmonization_masks_over_synthetic_masks_checks_and_trains(tmp_path: Path) -> None:
    from montage.cli.common import load_config_for
    from montage.core.registry import TASKS

    over = ["data.source=masks", "data.mask_source=synthetic", "data.size=32", "data.synthetic_train=10"]
    rc, report = _check(tmp_path, "harmonization", *over, "--workers", "0")
    assert rc == 0 and report["rejected"] == [] and report["splits"]["all"]["samples"] == 10
    train, val = TASKS.get("harmonization")(load_config_for("harmonization", None, over)).datasets()
    assert (len(train), len(val)) == (9, 1)  # val_fraction 0.1 held out of the 10
    sample = train[0]
    assert sample["composite"].shape == (3, 32, 32) and 0 < sample["mask"].mean() < 1


def test_files_that_do_not_decode_are_unreadable(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img, msk = tmp_path / "img", tmp_path / "mask"
    m = np.zeros((16, 20), np.uint8)
    m[4:10, 5:12] = 255
    for name in "abcde":
        _rgb(img / f"{name}.png", 16, 20, seed=ord(name))
        msk.mkdir(exist_ok=True)
        cv2.imwrite(str(msk / f"{name}.png"), m)
    (img / "b.png").write_bytes(rng.bytes(500))  # random bytes with an image extension
    (img / "c.png").write_bytes(b"")  # empty
    (img / "d.png").write_bytes((img / "d.png").read_bytes()[:60])  # truncated
    (msk / "e.png").write_bytes(rng.bytes(200))  # the mask does not decode
    rc, report = _check(
        tmp_path, "segmentation", "data.source=folder", f"data.images={img}", f"data.masks={msk}", "--workers", "0"
    )
    assert rc == 1 and report["splits"]["all"]["ok"] == 1
    assert _reasons(report) == {"unreadable": ["b.png", "c.png", "d.png", "e.png"]}
    messages = {Path(r["name"]).name: r["message"] for r in report["rejected"]}
    assert str(img / "b.png") in messages["b.png"] and str(msk / "e.png") in messages["e.png"]
