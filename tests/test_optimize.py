"""Pruning and distillation as deployment variants: channel pruning narrows every task's
network and the pruned checkpoint still loads and runs the task's evaluation; magnitude
pruning zeroes weights; ``montage optimize --method prune|distill`` fine-tunes or trains
through the normal loop and registers a version tagged with what it is and how it measured
against its parent; bad requests get clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from montage.launch.local import fit_local
from montage.launch.optimize import distill_model, prune_model
from montage.platform.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from montage.platform.evaluate import evaluate
from montage.platform.inference import load_for_inference
from montage.platform.pruning import conv_channels, count_params, prune_channels, prune_magnitude
from montage.tracking import registry as reg
from montage.tracking.variants import validation_batch

VARIANT_TAGS = (
    "montage.variant",
    "montage.runtime",
    "montage.parent",
    "montage.params",
    "montage.size_mb",
    "montage.latency_ms",
    "montage.parent_latency_ms",
    "montage.quality_metric",
    "montage.quality",
    "montage.parent_quality",
    "montage.quality_delta",
)


@pytest.mark.parametrize("task", ["segmentation", "harmonization", "pix2pix"])
def test_channel_pruning_narrows_the_network_and_the_checkpoint_reloads(tiny_config, tmp_path: Path, task: str) -> None:
    ckpt = fit_local(
        tiny_config(task, "tracking.enabled=false", "train.max_steps=1", f"run.name={task}")
    ).best_checkpoint
    inst, nets = load_for_inference(ckpt, task=task)
    batch = validation_batch(inst, 2)
    spec = inst.export_spec(nets, batch)
    net = nets[inst.export_net]
    params, channels = count_params(net), conv_channels(net)
    with torch.no_grad():
        before = spec.module(*spec.inputs.values())
    report = prune_channels(spec.module, tuple(spec.inputs.values()), 0.5)
    assert report.params_after < 0.6 * params and conv_channels(net) < channels
    with torch.no_grad():
        after = spec.module(*spec.inputs.values())
    assert after.shape == before.shape  # the head keeps its outputs

    # saved as plain tensors, rebuilt from the config + the weights' shapes, same answers
    state = load_checkpoint(ckpt)
    pruned = save_checkpoint({**state, "nets": {k: v.state_dict() for k, v in nets.items()}}, tmp_path / "pruned.pt")
    inst2, nets2 = load_for_inference(pruned, task=task)
    assert count_params(nets2[inst2.export_net]) == report.params_after
    spec2 = inst2.export_spec(nets2, batch)
    with torch.no_grad():
        torch.testing.assert_close(spec2.module(*spec.inputs.values()), after)
    metrics = evaluate(pruned)  # the task's own evaluation runs on the pruned network
    assert inst.monitor[0] in metrics and metrics["val/samples"] > 0


def test_magnitude_pruning_zeroes_the_smallest_weights(tiny_config) -> None:
    ckpt = fit_local(tiny_config("segmentation", "tracking.enabled=false", "train.max_steps=1")).best_checkpoint
    inst, nets = load_for_inference(ckpt, task="segmentation")
    spec = inst.export_spec(nets, validation_batch(inst, 1))
    params = count_params(nets["net"])
    report = prune_magnitude(spec.module, tuple(spec.inputs.values()), 0.4)
    assert report.zeros > 0.35 and report.params_after == params  # same shapes, zeros inside
    assert not any(name.endswith(("_orig", "_mask")) for name in nets["net"].state_dict())  # made permanent


def _registered_parent(tiny_config, task: str = "segmentation"):
    cfg = tiny_config(task, "train.max_steps=2", "run.name=parent", "tracking.log_model=false")
    fit = fit_local(cfg)
    reg.register_checkpoint(cfg, fit.best_checkpoint, fit.mlflow_run_id, "val/iou", "max", 0.5, "manual", {}, "better")
    return cfg


def test_prune_fine_tunes_and_registers_a_tagged_variant(tiny_config, tmp_path: Path) -> None:
    cfg = _registered_parent(tiny_config)
    uri = cfg.tracking.uri
    made = prune_model(
        "segmentation",
        "models:/montage-segmentation@champion",
        ratio=0.5,
        epochs=1,
        tracking_uri=uri,
        no_ray=True,
        overrides=[
            f"run.storage={tmp_path / 'runs'}",
            f"tracking.artifacts={tmp_path / 'mlartifacts'}",
            "train.max_steps=2",
        ],
    )
    assert made.registered == "models:/montage-segmentation/2" and made.params < 0.6 * made.parent_params
    mv = reg.client(uri).get_model_version("montage-segmentation", "2")
    assert all(k in mv.tags for k in VARIANT_TAGS), sorted(set(VARIANT_TAGS) - set(mv.tags))
    assert mv.tags["montage.variant"] == "pruned-0.5" and mv.tags["montage.runtime"] == "torch"
    assert (
        mv.tags["montage.parent"] == "models:/montage-segmentation/1" and int(mv.tags["montage.params"]) == made.params
    )
    assert float(mv.tags["montage.quality_delta"]) == pytest.approx(
        made.measurement.value - made.measurement.parent_value, abs=1e-3
    )
    # the fine-tune was an ordinary tracked run that started from the pruned weights
    run = reg.client(uri).get_run(made.mlflow_run_id)
    assert run.data.params["init.checkpoint"].endswith("-pruned.pt") and run.info.status == "FINISHED"
    assert str(reg.champion("segmentation", uri).version) == "1"  # no alias moves
    inst, nets = load_for_inference(
        reg.download_model_checkpoint("models:/montage-segmentation/2", uri), task="segmentation"
    )
    assert count_params(nets["net"]) == made.params  # the registered checkpoint rebuilds in its pruned shape


def test_distill_trains_a_smaller_student_and_registers_it(tiny_config, tmp_path: Path) -> None:
    cfg = _registered_parent(tiny_config)
    uri = cfg.tracking.uri
    made = distill_model(
        "segmentation",
        "models:/montage-segmentation/1",
        epochs=1,
        tracking_uri=uri,
        no_ray=True,
        overrides=[
            f"run.storage={tmp_path / 'runs'}",
            f"tracking.artifacts={tmp_path / 'mlartifacts'}",
            "train.max_steps=2",
        ],
    )
    assert made.params < made.parent_params and "model.decoder_channels=[8, 8, 4, 4, 4]" in made.overrides
    mv = reg.client(uri).get_model_version("montage-segmentation", made.registered.rsplit("/", 1)[1])
    assert mv.tags["montage.variant"] == "student" and all(k in mv.tags for k in VARIANT_TAGS)
    run = reg.client(uri).get_run(made.mlflow_run_id)
    assert "train/distill" in run.data.metrics and float(run.data.params["distill.weight"]) == 1.0


def test_bad_optimize_requests_get_clear_errors(tiny_config, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(CheckpointError):
        prune_model("segmentation", str(junk), no_ray=True)
    ckpt = fit_local(
        tiny_config("harmonization", "tracking.enabled=false", "train.max_steps=1", "run.name=h")
    ).best_checkpoint
    with pytest.raises(CheckpointError, match="harmonization"):
        distill_model("segmentation", ckpt, no_ray=True)
    with pytest.raises(ValueError, match="ratio"):
        prune_model("harmonization", ckpt, ratio=1.5, no_ray=True, register=False)
    with pytest.raises(ValueError, match="channels, magnitude"):
        prune_model("harmonization", ckpt, mode="random", no_ray=True)
