"""``montage demo``: the whole platform on a laptop, on synthetic data, in a few minutes.

A segmentation sweep (Optuna + ASHA, 2-worker TorchTrainers) → brief harmonization and
pix2pix training → champions in the MLflow registry → the Serve application → one
``/v1/composite`` call → the result and its layers in ``demo_out/``.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path

import numpy as np

from montage.platform.config import load_config
from montage.platform.registry import TASKS

log = logging.getLogger("montage.demo")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TUNE_DIR = Path(__file__).resolve().parent.parent / "tune_configs"


def packaged_config(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def _step(n: int, text: str) -> None:
    log.info("[demo %d/6] %s", n, text)


def run_demo(out: Path, workers: int = 2) -> int:
    import os

    import requests

    from montage.platform import sweep_tracking as st
    from montage.platform.imaging import decode_image, write_image
    from montage.platform.train import fit_ray
    from montage.platform.tune import load_tune_config, run_sweep
    from montage.serve.app import load_serve_config, run
    from montage.tasks.segmentation.sources import SyntheticPersons, textured_background

    t0 = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    uri = f"sqlite:///{out / 'mlruns.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    common = [f"run.storage={out / 'runs'}", f"tracking.uri={uri}", f"tracking.artifacts={out / 'mlartifacts'}", "train.progress=false"]

    _step(1, f"segmentation sweep: 2 trials (Optuna TPE + ASHA), each a {workers}-worker TorchTrainer")
    tcfg, base, params = load_tune_config(packaged_tune("segmentation-tiny"), [
        "num_samples=2", f"name=demo-{stamp}", f"storage={out / 'tune'}", f"resources.workers={workers}",
        "base.train.epochs=3", "base.data.synthetic_train=128", *[f"base.{o}" for o in common], "promote=always",
    ])
    sweep = run_sweep(tcfg, base, params)
    if sweep.registered is None:
        log.error("the sweep produced no model: %s", sweep.errors[:1])
        return 1

    rows = [("segmentation", sweep.best["metrics"]["best/val/iou"], "val/iou")]
    for n, task, metric in ((2, "harmonization", "val/fmse"), (3, "pix2pix", "val/l1")):
        _step(n, f"{task}: a short {workers}-worker run, its best checkpoint registered as champion")
        cfg = load_config(task, TASKS.get(task).spec, packaged_config(f"{task}-tiny"), [
            f"scaling.workers={workers}", "train.epochs=3", "data.synthetic_train=128", f"run.name={task}-{stamp}", *common,
        ])
        res = fit_ray(cfg)
        if res["error"] or not res["best_checkpoint"]:
            log.error("%s training failed: %s", task, res["error"])
            return 1
        run_id = _run_id_of(uri, task, cfg.run.name)
        value = res["metrics"][f"best/{metric}"]
        mode = TASKS.get(task).monitor[1]
        st.register_checkpoint(cfg, res["best_checkpoint"], run_id, metric, mode, value, "demo", {}, "always")
        rows.append((task, value, metric))
        if task == "harmonization":
            rows.append(("  composite baseline", res["metrics"]["val/baseline_fmse"], "val/fmse"))

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
    r = requests.post(f"{url}/v1/composite", files=files, data={"x": 0.35, "y": 0.55, "scale": 0.8}, params={"return": "layers"}, timeout=120)
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
    print(f"  {'model':22s} {'metric':10s} value")
    for task, value, metric in rows:
        print(f"  {task:22s} {metric:10s} {value:.4g}")
    print(f"  sweep: {sweep.name}, best {sweep.best['name']}; champions: {', '.join(f'{k}: {v}' for k, v in health['models'].items())}")
    print(f"  /v1/composite answered in {latency * 1000:.0f} ms")
    print(f"  outputs:   {out}/result.png (alpha.png, composite.png, mask.png, person.png, background.png)")
    print(f"  MLflow UI: mlflow ui --backend-store-uri {uri}")
    print(f"  serve it:  MLFLOW_TRACKING_URI={uri} montage serve --config serve.yaml")
    return 0


def packaged_tune(name: str) -> Path:
    return TUNE_DIR / f"{name}.yaml"


def _run_id_of(uri: str, task: str, run_name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[f"montage-{task}"], filter_string=f"attributes.run_name = '{run_name}'")
    return str(runs.iloc[0]["run_id"])
