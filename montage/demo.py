"""``montage demo``: the whole platform on a laptop, on synthetic data, in a few minutes.

Segmentation and harmonization trained by 2-worker TorchTrainers (DDP) → a pix2pix sweep
(Optuna + ASHA, two trials at once) → champions in the MLflow registry → the Serve
application → one ``/v1/composite`` call → the result and its layers in ``demo_out/``.
Each model is trained to its quality target on the synthetic validation set (IoU ≥ 0.92,
fMSE ≤ 0.18× the composite's, L1 ≤ 0.60× the mean face's); the summary prints each figure
beside the classical methods measured on the same validation images (``Task.baselines``:
GrabCut from the true box, the colour-statistics transfer in Lab and RGB, the mean face and
the mean face warped to the landmarks) and says whether the model beats the strongest.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path

import numpy as np

from montage.core.config import load_config
from montage.core.paths import packaged_config, packaged_tune
from montage.core.registry import TASKS

log = logging.getLogger("montage.demo")


def _step(n: int, text: str) -> None:
    log.info("[demo %d/6] %s", n, text)


Row = tuple[str, str, float, str]  # (model, metric, value, note)


def baseline_rows(cfg, metric: str, mode: str, value: float, reference: str = "") -> list[Row]:
    """The classical baselines of ``cfg``'s task on its validation set beside the trained ``value``
    of ``metric`` (``val/<key>``): one row per baseline (as a ratio of ``reference`` when named),
    then whether the model beats the strongest."""
    from copy import deepcopy

    from montage.platform.baselines import compare, measure_baselines
    from montage.platform.runner import make_task

    cfg = deepcopy(cfg)
    cfg.train.cache_data = False  # only the samples the baselines read are generated
    task = make_task(cfg)
    _, val = task.datasets()
    base = measure_baselines(task, val)
    key = metric.split("/", 1)[1]
    rows: list[Row] = []
    for name, metrics in base.items():
        ref = reference.replace("_", " ")
        note = f"{metrics[key] / base[reference][key]:.2f}× {ref}" if reference and reference != name else ""
        rows.append((f"  {name.replace('_', ' ')}", metric, metrics[key], note))
    c = compare(value, base, key, mode)
    verdict = "beats it" if c.beats else "does NOT beat it"
    rows.append(("  trained ÷ strongest", c.best_name.replace("_", " "), c.ratio, f"× (the trained model {verdict})"))
    return rows


def run_demo(out: Path, workers: int = 2) -> int:
    import os

    import requests

    from montage.launch.local import with_workers
    from montage.launch.train import fit_ray
    from montage.launch.tune import load_tune_config, run_sweep
    from montage.platform.imaging import decode_image, write_image
    from montage.platform.masks import SyntheticPersons, textured_background
    from montage.serve.app import load_serve_config, run
    from montage.tracking import registry as st

    t0 = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    uri = f"sqlite:///{out / 'mlruns.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cpus = os.cpu_count() or 2
    common = [
        f"run.storage={out / 'runs'}",
        f"tracking.uri={uri}",
        f"tracking.artifacts={out / 'mlartifacts'}",
        "train.progress=false",
    ]

    rows: list[Row] = []
    for n, task in ((1, "segmentation"), (2, "harmonization")):
        _step(
            n,
            f"{task}: a {workers}-worker TorchTrainer (DDP) on synthetic data, its best checkpoint registered as "
            "champion",
        )
        # the recipe's global batch (and so its steps) on however many workers were asked for
        cfg = with_workers(
            load_config(
                task, TASKS.get(task).spec, packaged_config(f"{task}-tiny"), [f"run.name={task}-{stamp}", *common]
            ),
            workers,
        )
        res = fit_ray(cfg)
        if res.error or not res.best_checkpoint or not res.mlflow_run_id:
            log.error("%s training failed: %s", task, res.error or "no best checkpoint or MLflow run")
            return 1
        best = res.best_metrics
        metric, mode = TASKS.get(task).monitor
        st.register_checkpoint(
            cfg, res.best_checkpoint, res.mlflow_run_id, metric, mode, best[metric], "demo", {}, "always"
        )
        if task == "segmentation":
            rows += [
                (task, "val/iou", best["val/iou"], "≥ 0.92"),
                *baseline_rows(cfg, "val/iou", "max", best["val/iou"]),
                ("", "val/dice", best["val/dice"], "≥ 0.93"),
                ("", "val/trimap_acc", best["val/trimap_acc"], ""),
            ]
        else:
            ratio = best["val/fmse"] / best["val/baseline_fmse"]
            rows += [
                (task, "val/fmse", best["val/fmse"], f"{ratio:.2f}× composite (≤ 0.18×)"),
                *baseline_rows(cfg, "val/fmse", "min", best["val/fmse"], "composite"),
            ]

    _step(
        3,
        "pix2pix sweep: 2 trials at once (Optuna TPE + ASHA), each a 1-worker TorchTrainer; the best registered as "
        "champion",
    )
    tcfg, base, params = load_tune_config(
        packaged_tune("pix2pix-tiny"),
        [
            "num_samples=2",
            f"name=demo-{stamp}",
            f"storage={out / 'tune'}",
            "resources.workers=1",
            f"resources.cpus_per_worker={max(0.5, (cpus - 0.1) / 2):g}",
            *[f"base.{o}" for o in common],
            "promote=always",
        ],
    )
    sweep = run_sweep(tcfg, base, params)
    if sweep.registered is None or sweep.best is None:
        log.error("the sweep produced no model: %s", sweep.errors[:1])
        return 1
    m = sweep.best.metrics
    ratio = m["best/val/l1"] / m["val/baseline_l1"]
    rows += [
        ("pix2pix", "val/l1", m["best/val/l1"], f"{ratio:.2f}× mean face (≤ 0.60×)"),
        *baseline_rows(base, "val/l1", "min", m["best/val/l1"], "mean_face"),
    ]

    _step(4, "starting the Serve application with the champions")
    port = 8000
    run(load_serve_config(None, [f"tracking_uri={uri}", f"port={port}", "pix2pix.enabled=true"]))
    url = f"http://127.0.0.1:{port}"
    health = requests.get(f"{url}/healthz", timeout=60).json()

    _step(5, "POST /v1/composite with a generated person photo and background")
    rng = np.random.default_rng(7)
    person = SyntheticPersons(1, size=192, seed=11).load(0)[0]
    background = textured_background(rng, 240, 360)
    write_image(out / "person.png", person)
    write_image(out / "background.png", background)
    from montage.platform.imaging import encode_png

    files = {"person": encode_png(person), "background": encode_png(background)}
    t_req = time.perf_counter()
    r = requests.post(
        f"{url}/v1/composite",
        files=files,
        data={"x": 0.35, "y": 0.55, "scale": 0.8},
        params={"return": "layers"},
        timeout=120,
    )
    latency = time.perf_counter() - t_req
    r.raise_for_status()
    layers = r.json()
    for key in ("image", "alpha", "composite", "mask"):
        arr = decode_image(base64.b64decode(layers[key]), mode="unchanged")
        write_image(out / f"{'result' if key == 'image' else key}.png", arr)

    _step(6, "done; shutting Serve down")
    from ray import serve

    serve.shutdown()
    print(f"\nmontage demo finished in {time.perf_counter() - t0:.0f}s")
    print(f"  {'model':22s} {'metric':16s} {'value':>8s}  target")
    for task, metric, value, bar in rows:
        print(f"  {task:22s} {metric:16s} {value:8.4g}  {bar}")
    print(
        f"  sweep: {sweep.name}, best {sweep.best.name}; champions: "
        f"{', '.join(f'{k}: {v}' for k, v in health['models'].items())}"
    )
    print(f"  /v1/composite answered in {latency * 1000:.0f} ms")
    print(f"  outputs:   {out}/result.png (alpha.png, composite.png, mask.png, person.png, background.png)")
    print(f"  MLflow UI: mlflow ui --backend-store-uri {uri}")
    print(f"  serve it:  MLFLOW_TRACKING_URI={uri} montage serve --config serve.yaml")
    return 0
