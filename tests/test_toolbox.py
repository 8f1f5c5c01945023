"""The experimenter's toolbox: sanity checks, the LR range test, multi-scale training,
hard-negative mining and OpenVINO, on a tiny image task (no Ray, ``toolbox_task.py``) and the real
tasks' smoke configs where the platform path matters. K-fold: ``test_toolbox_cv.py``,
``test_toolbox_ray.py``."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from stores import mlflow_store
from toolbox_task import one_thread, pic_cfg, search  # noqa: F401  (one_thread: the module's fixture)
from torch import nn

from montage.launch.local import fit_local
from montage.platform.build import make_loader
from montage.platform.checkpoint import load_checkpoint
from montage.platform.lrfind import lr_find
from montage.platform.multiscale import MultiScaleLoader
from montage.platform.runner import make_task
from montage.platform.sampling import ShardSampler
from montage.platform.sanity import fast_dev_run, overfit_and_grad_flow

# ------------------------------------------------------------------------------ checks


def test_overfit_check_passes_a_healthy_model_and_names_the_term_of_a_detached_head(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    healthy = overfit_and_grad_flow(pic_cfg(tmp_path), tmp_path / "ok", cpu, steps=40)
    assert [r.passed for r in healthy] == [True, True], [r.line() for r in healthy]

    detached = overfit_and_grad_flow(pic_cfg(tmp_path, "model.detach_aux=true"), tmp_path / "bad", cpu, steps=40)
    overfit, flow = detached
    assert not overfit.passed and "do not move: aux" in overfit.message, overfit.message
    assert (tmp_path / "bad" / "overfit.png").is_file() and (tmp_path / "bad" / "grad_flow.png").is_file()
    # the cut head gets no gradient at all
    assert not flow.passed and flow.details["flags"] == {"main:net.aux": "zero gradient"}, flow.message

    # the whole output detached: no gradient reaches any parameter
    cfg = pic_cfg(tmp_path, "model.detach_aux=true", "loss.mse=0")
    nothing = overfit_and_grad_flow(cfg, tmp_path / "none", cpu, steps=5)[0]
    assert not nothing.passed and "no gradient reaches the parameters" in nothing.message


def test_grad_flow_flags_a_layer_frozen_by_mistake(tmp_path: Path) -> None:
    cfg = pic_cfg(tmp_path, "model.freeze_aux=true")
    flow = overfit_and_grad_flow(cfg, tmp_path, torch.device("cpu"), steps=3)[1]
    assert flow.details["flags"] == {"main:net.aux": "zero gradient (requires_grad=False)"}
    assert flow.details["norms"]["main:net.head"] > 0 and flow.details["norms"]["main:net.body"] > 0


def test_grad_flow_flags_nan_and_exploding_gradients(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    nan = overfit_and_grad_flow(pic_cfg(tmp_path, "model.nan_aux=true"), tmp_path / "nan", cpu, steps=3)[1]
    assert not nan.passed and nan.details["flags"] == {"main:net.aux": "non-finite gradient"}, nan.message
    assert all(np.isfinite(nan.details["norms"][f"main:net.{k}"]) for k in ("body", "head"))

    big = overfit_and_grad_flow(pic_cfg(tmp_path, "model.aux_gain=1e5"), tmp_path / "big", cpu, steps=3)[1]
    assert not big.passed and list(big.details["flags"]) == ["main:net.aux"], big.message
    assert big.details["flags"]["main:net.aux"].startswith("exploding gradient")
    # the same layer at its usual gain is not flagged, nor the large one under a higher threshold
    ok = overfit_and_grad_flow(pic_cfg(tmp_path), tmp_path / "ok", cpu, steps=3)[1]
    assert ok.passed and big.details["norms"]["main:net.aux"] > 1e3 * ok.details["norms"]["main:net.aux"]
    cfg = pic_cfg(tmp_path, "model.aux_gain=1e5")
    mild = overfit_and_grad_flow(cfg, tmp_path / "mild", cpu, steps=3, explode=1e9)[1]
    assert mild.passed and mild.details["flags"] == {}


def test_montage_check_exits_by_its_result_and_logs_to_mlflow(tmp_path: Path, monkeypatch, capsys) -> None:
    from montage.cli import main

    monkeypatch.chdir(tmp_path)
    track = [f"tracking.uri={mlflow_store(tmp_path)}", f"tracking.artifacts={tmp_path / 'art'}"]
    assert main(["check", "pictures", *track, "--steps", "40", "--out", "ok"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("PASS") == 3 and "train + validation step" in printed
    assert {p.name for p in (tmp_path / "ok").iterdir()} >= {"overfit.png", "grad_flow.png", "checks.json"}
    assert main(["check", "pictures", *track, "model.detach_aux=true", "--steps", "12", "--out", "bad"]) == 1
    assert "FAIL overfit one batch" in capsys.readouterr().out
    runs = search(f"sqlite:///{tmp_path / 'mlruns.db'}", "tags.`montage.role` = 'check'")
    assert sorted(r.data.tags["montage.check.passed"] for r in runs) == ["False", "True"]


def test_one_train_and_validation_step_on_real_samples(tmp_path: Path, seg_config) -> None:
    cfg = seg_config("train.batch_size=2", "data.synthetic_train=4", "data.synthetic_val=2", "train.loader_workers=0")
    result = fast_dev_run(cfg, tmp_path, torch.device("cpu"))
    assert result.passed and "checkpoint written and loaded back" in result.message, result.message
    assert (tmp_path / "samples.png").is_file() and result.details["metrics"]["val/samples"] == 2


# ----------------------------------------------------------------------------- lr-find


def test_lr_find_suggests_within_3x_of_the_best_lr_measured_by_short_fits(tmp_path: Path) -> None:
    cfg = pic_cfg(tmp_path, "loss.aux=0", "data.n=32")
    (found,) = lr_find(cfg, tmp_path, steps=60, lo=1e-4, hi=10.0)
    assert (tmp_path / "lr_find.png").is_file() and found.config_key == "optim.lr"
    # the tuned lr: the best final loss of equally short fits on a grid (factor √10 apart)
    grid = [10 ** (e / 2) for e in range(-7, 1)]
    finals = {}
    for lr in grid:
        summary = fit_local(pic_cfg(tmp_path, "loss.aux=0", "data.n=32", f"optim.lr={lr}", "train.epochs=4"))
        finals[lr] = summary.metrics["val/mse"] if np.isfinite(summary.metrics["val/mse"]) else np.inf
    tuned = min(finals, key=finals.get)
    assert tuned / 3 <= found.suggested <= tuned * 3, (found.suggested, tuned, finals)
    assert found.rule == "valley" and found.steepest < found.valley < found.min_lr


def test_lr_find_logs_its_curve_and_suggestion_to_mlflow(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    from montage.cli import main

    monkeypatch.chdir(tmp_path)
    uri = mlflow_store(tmp_path)
    track = [f"tracking.uri={uri}", f"tracking.artifacts={tmp_path / 'art'}", "loss.aux=0"]
    assert main(["lr-find", "pictures", *track, "--steps", "30", "--lo", "1e-4", "--hi", "10", "--out", "lrf"]) == 0
    printed = capsys.readouterr().out
    (found,) = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    (run,) = search(uri, "tags.`montage.role` = 'lr-find'")
    assert run.info.status == "FINISHED" and run.info.run_id in printed
    m = run.data.metrics
    assert m["lr_find/main/suggested_lr"] == pytest.approx(found["suggested"]) == pytest.approx(found["valley"])
    assert m["lr_find/main/steepest_lr"] == pytest.approx(found["steepest"])
    assert f"suggested lr {found['suggested']:.3g}" in printed
    client = mlflow.MlflowClient(uri)
    lrs = [x.value for x in sorted(client.get_metric_history(run.info.run_id, "lr_find/main/lr"), key=lambda x: x.step)]
    loss = sorted(client.get_metric_history(run.info.run_id, "lr_find/main/loss"), key=lambda x: x.step)
    assert len(lrs) == len(loss) == len(found["lrs"]) and lrs == pytest.approx(found["lrs"])
    assert lrs[0] == pytest.approx(1e-4) and all(b > a for a, b in zip(lrs, lrs[1:]))  # the exponential sweep
    assert [x.value for x in loss] == pytest.approx(found["smoothed"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"lr_find.json", "lr_find.png"}


def test_lr_find_sweeps_each_gan_optimizer_and_writes_both_rates(tmp_path: Path, monkeypatch) -> None:
    import yaml

    from montage.cli import main
    from montage.core.paths import packaged_config

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "gan.yaml"
    tree = yaml.safe_load(Path(packaged_config("pix2pix-smoke")).read_text())
    config.write_text(yaml.safe_dump({**tree, "optim": {"lr": 0.5}}))
    code = main(
        ["lr-find", "pix2pix", "--config", str(config), "--steps", "6", "--out", "lrf", "--write"]
        + ["tracking.enabled=false"]
        + ["data.synthetic_train=8", "data.synthetic_val=4", "train.batch_size=4"]
    )
    assert code == 0
    written = yaml.safe_load(config.read_text())
    assert set(written["optim"]) == {"lr", "lr_d"} and written["optim"]["lr"] != 0.5
    assert (tmp_path / "lrf" / "lr_find.png").is_file()


# ------------------------------------------------------------------------- multi-scale


def test_multi_scale_batches_share_a_size_across_ranks_and_validation_keeps_its_own(tmp_path: Path) -> None:
    cfg = pic_cfg(tmp_path, "data.scales=[8,16,24]")
    task = make_task(cfg)
    train, val = task.datasets()
    cpu = torch.device("cpu")
    ranks = [
        MultiScaleLoader(make_loader(train, cfg, True, cpu, rank=r, world_size=2), cfg.data.scales, 0) for r in (0, 1)
    ]
    sizes = []
    for epoch in (0, 1):
        for loader in ranks:
            loader.sampler.set_epoch(epoch)
        per_rank = [[tuple(b["image"].shape[-2:]) for b in loader] for loader in ranks]
        assert per_rank[0] == per_rank[1]  # the same size on every rank at every step
        assert all(tuple(b["target"].shape[-2:]) == s for b, s in zip(ranks[0], per_rank[0]))
        sizes += per_rank[0]
    assert len(set(sizes)) > 1 and set(sizes) <= {(8, 8), (16, 16), (24, 24)}
    summary = fit_local(pic_cfg(tmp_path, "data.scales=[8,24]", "train.epochs=1"))
    assert summary.metrics["val/samples"] == 9 and np.isfinite(summary.metrics["train/total"])


# ------------------------------------------------------------------------- hard mining


def test_hard_mining_draws_the_hard_samples_more_often_and_resumes_exactly(tmp_path: Path) -> None:
    mining = ["data.hard_mining.fraction=0.25", "data.hard_mining.weight=4", "train.epochs=3", "train.seed=1"]
    mining.append("data.offset=1.0")
    full = fit_local(pic_cfg(tmp_path, *mining, "run.name=full"))
    state = load_checkpoint(Path(full.run_dir) / "latest.pt")
    weights = state["hooks"]["hard_mining"]["weights"]
    assert int((weights > 1).sum()) == 6  # 25 % of 24
    # what the sampler draws with those weights: the hard samples about 4x as often as the others
    sampler = ShardSampler(24, 4, seed=1)
    plain = list(sampler)
    sampler.set_weights(weights)
    drawn = np.bincount(list(sampler), minlength=24)
    assert list(sampler) != plain and sorted(plain) == list(range(24))
    hard = weights.numpy() > 1
    assert drawn[hard].mean() > 2 * drawn[~hard].mean()
    # the hardest samples are the ones whose targets carry the offset (every third sample)
    assert hard[::3].sum() >= 5

    fit_local(pic_cfg(tmp_path, *mining, "run.name=paused", "train.pause_after=1"))
    resumed = fit_local(pic_cfg(tmp_path, *mining, "run.name=paused"), resume=tmp_path / "runs" / "paused")
    a, b = load_checkpoint(Path(full.run_dir) / "latest.pt"), load_checkpoint(Path(resumed.run_dir) / "latest.pt")
    for k, v in a["nets"]["net"].items():
        assert torch.equal(v, b["nets"]["net"][k]), k
    assert torch.equal(a["hooks"]["hard_mining"]["weights"], b["hooks"]["hard_mining"]["weights"])
    # and mining changed the training: without it the weights differ
    off = fit_local(pic_cfg(tmp_path, "train.epochs=3", "train.seed=1", "data.offset=1.0", "run.name=plain"))
    c = load_checkpoint(Path(off.run_dir) / "latest.pt")
    assert not torch.equal(a["nets"]["net"]["head.weight"], c["nets"]["net"]["head.weight"])


def test_hard_mining_scores_and_draws_on_two_ranks_what_one_process_draws(tmp_path: Path) -> None:
    """The DDP contract without DDP: each rank scores its share of the training samples (summed over the
    ranks by an all-reduce, here by hand), and with the resulting weights 2 ranks at batch 4 draw, global
    batch by global batch, what one process draws at batch 8."""
    from montage.platform.mining import HardMining, mining_weights
    from montage.platform.runner import WorkerEnv, build_loop

    mining = ["data.hard_mining.fraction=0.25", "data.hard_mining.weight=4", "data.offset=1.0", "train.seed=3"]
    one = build_loop(pic_cfg(tmp_path, *mining, "train.batch_size=8"), WorkerEnv(torch.device("cpu")), [])
    cfg = pic_cfg(tmp_path, *mining, "train.batch_size=4")
    ranks = [build_loop(cfg, WorkerEnv(torch.device("cpu"), rank=r, world_size=2), []) for r in (0, 1)]
    hook = HardMining(cfg.data.hard_mining)
    hook.resolve(one.task.monitor)
    whole = hook.score(one)
    shares = [hook.score(loop) for loop in ranks]
    for r, share in enumerate(shares):  # rank r scored samples r, r+2, …; the others are left to the other rank
        assert torch.all(share[r::2] > 0) and torch.all(share[1 - r :: 2] == 0)
    torch.testing.assert_close(shares[0] + shares[1], whole)
    weights = mining_weights(whole, 0.25, 4.0, hook.hard_is_high)
    assert int((weights > 1).sum()) == 6

    samplers = [loop.train_loader.sampler for loop in (one, *ranks)]
    for sampler in samplers:
        sampler.set_weights(weights)
    draws = []
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        single, r0, r1 = (list(s) for s in samplers)
        assert len(single) == len(r0) + len(r1) == 24
        assert single == [i for step in range(3) for i in r0[4 * step : 4 * step + 4] + r1[4 * step : 4 * step + 4]]
        draws.append(single)
    assert draws[0] != draws[1] and len(set(draws[0])) < 24  # drawn anew each epoch, with replacement


# ---------------------------------------------------------------------------- OpenVINO


def test_openvino_runs_an_onnx_export_like_pytorch(tmp_path: Path) -> None:
    from montage.platform.export import ExportError, ExportSpec
    from montage.platform.ov_runtime import OpenVINONet, to_openvino

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1)).eval()
    x = torch.rand(2, 3, 32, 32)
    onnx = tmp_path / "net.onnx"
    # the legacy exporter keeps this test fast; `montage openvino` converts the platform's dynamo export
    torch.onnx.export(net, (x,), str(onnx), input_names=["image"], output_names=["out"], dynamo=False)
    report = to_openvino(ExportSpec(net, {"image": x}, ["out"]), onnx, tmp_path / "net.xml", repeats=2)
    assert report.max_abs_diff < 1e-4 and Path(report.path).with_suffix(".bin").is_file()
    assert report.latency_ms > 0 and report.onnxruntime_ms > 0
    with torch.no_grad():
        assert torch.allclose(OpenVINONet(report.path)(x), net(x), atol=1e-4)
        assert torch.allclose(OpenVINONet(onnx)(x), net(x), atol=1e-4)  # Serve's runtime: openvino reads the ONNX
    wrong = nn.Sequential(nn.Conv2d(3, 1, 1)).eval()  # not the network the file was exported from
    with pytest.raises(ExportError, match="differs from PyTorch"):
        to_openvino(ExportSpec(wrong, {"image": x}, ["out"]), onnx, tmp_path / "wrong.xml")
