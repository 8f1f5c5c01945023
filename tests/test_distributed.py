"""Distributed training computes what one process computes: 2 DDP workers at batch b reach
the weights of 1 worker at batch 2b on the same samples in the same order (under Ray for segmentation
and pix2pix, whose D and G steps take the same path; harmonization's steps are checked to split over two
ranks in this process), all ranks hold identical weights after every optimizer step, and validation
counts every sample exactly once (an odd-sized set: no padded duplicates); a 2-worker run checkpoints
and logs from rank 0 only, and paused and resumed under Ray ends where the uninterrupted one does (in one
process: test_resume), and resumed once more at its end reports its final epoch again."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from conftest import _tiny
from test_resume import RESUME, assert_resumed_like_straight

from montage.cli.training import _summary
from montage.launch.local import fit_local
from montage.launch.train import fit_ray
from montage.platform.checkpoint import FILENAME, load_checkpoint
from montage.platform.sampling import ShardSampler

# batch-size-independent settings: group/instance norm (batch norm sees per-worker statistics on
# CPUs, where PyTorch has no SyncBatchNorm); no dropout and fixed GAN labels (each rank draws its
# own dropout masks and label-smoothing targets: the same distribution, not the same numbers); SGD
# (Adam's first steps are lr·sign(g), so float-order noise in near-zero gradients shows up at lr scale)
EQUIVALENT = {
    "segmentation": ["model.norm=group", "model.encoder_dropout=0", "model.bottleneck_dropout=0"],
    "harmonization": ["model.norm=group", "model.bottleneck_dropout=0"],
    "pix2pix": ["model.norm=instance", "model.dropout=0", "loss.real_label=[1.0,1.0]", "loss.fake_label=[0.0,0.0]"],
}
VAL = 9  # odd: 2 ranks get 5 and 4 samples
OPTIM = ["optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.05", "optim.weight_decay=0"]


def _weights(path: str, task: str) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path, task=task)
    return {f"{net}.{k}": v for net, sd in state["nets"].items() for k, v in sd.items() if v.is_floating_point()}


@pytest.mark.parametrize(
    "task, extra",
    [
        # multi-scale training: every rank resizes its share of a global batch to the same size
        # (segmentation at one scale is the special case of a single scale). A 64-px step among 32-px ones
        # makes these 3 steps chaotic in float order: on an Intel Xeon one process on 1 and on 2 threads ends
        # 1.4e-1 apart at lr 0.05 (2e-5 at one scale), 4e-6 at lr 0.01; on an AMD EPYC 3.7e-6 at lr 0.01 but
        # 3.5e-4 at lr 0.003, and 2 workers drifted 1.9e-3 from one at lr 0.01. At lr 0.001: 1.3e-7 between
        # thread counts, while a wrong split (one process at batch 4 instead of 8) is 6.1e-2 away
        pytest.param("segmentation", ["data.scales=[32,64]", "optim.lr=0.001"], id="segmentation-multiscale"),
        ("pix2pix", []),
    ],
)
def test_two_workers_match_one_worker_at_the_global_batch(ray_session, tiny_config, task: str, extra) -> None:
    common = [
        *EQUIVALENT[task],
        "train.epochs=1",
        "train.max_steps=3",
        "tracking.enabled=false",
        f"data.synthetic_val={VAL}",
        "train.check_replicas=1",
        *OPTIM,
        *extra,
    ]
    # the reference in this process on one torch thread, as a Ray worker on its CPU share runs (Ray sets
    # OMP_NUM_THREADS=1): another thread count sums convolution gradients in another order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = fit_local(tiny_config(task, *common, "scaling.workers=1", "train.batch_size=8", "run.name=one"))
    finally:
        torch.set_num_threads(threads)
    two = fit_ray(tiny_config(task, *common, "scaling.workers=2", "train.batch_size=4", "run.name=two"))
    assert one.error is None and two.error is None, (one.error, two.error)

    a, b = _weights(one.checkpoint, task), _weights(two.checkpoint, task)
    assert a.keys() == b.keys()
    # float32 sums a batch of 8 and two batches of 4 in other orders: a bias gradient adds up 32k pixel terms,
    # which leaves ~2e-5 of relative noise on a small bias after 3 steps (AMD EPYC here; <1e-5 on other CPUs).
    # A broken DDP is orders of magnitude away: ranks drawing other samples differ by ~2 (measured with one
    # process at batch 4 instead of 8); un-averaged gradients by the size of a whole step.
    drift = {k: ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-3)).item() for k in a}
    worst = max(drift, key=drift.get)
    assert drift[worst] < 1e-4, (
        f"2 workers drifted from 1 worker: max relative difference {drift[worst]:.2e} in {worst}"
    )

    # every optimizer step was followed by a replica check on 2 ranks (pix2pix: D and G steps)
    steps = 3 * (2 if task == "pix2pix" else 1)
    assert two.metrics["ddp/replica_checks"] == steps
    # validation: each of the 9 samples once, the same metrics as one process on the same weights
    assert one.metrics["val/samples"] == VAL and two.metrics["val/samples"] == VAL
    metric = one.best_metric
    assert two.metrics[metric] == pytest.approx(one.metrics[metric], rel=1e-4, abs=1e-6)


class _Backward:
    """A stepper that only backpropagates: the gradients a step would apply, to compare."""

    def optimize(self, loss: torch.Tensor, name: str = "main") -> None:
        loss.backward()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _grads(loop, batch) -> dict[str, torch.Tensor | None]:
    for net in loop.m.nets.values():
        net.train()
        net.zero_grad(set_to_none=True)
    loop.task.train_step(loop.m, batch, _Backward())
    params = [(f"{n}.{k}", p) for n, net in loop.m.nets.items() for k, p in net.named_parameters() if p.requires_grad]
    return {k: None if p.grad is None else p.grad.clone() for k, p in params}


def test_harmonization_steps_split_over_two_ranks(tiny_config) -> None:
    """What the Ray check above proves for segmentation and pix2pix, for harmonization's own steps and with
    the platform's DDP path left out (it is the same for every task): every parameter gets a gradient in a
    train step (DDP, which does not search for unused parameters, needs each one reduced every step), the
    gradient of a global batch of 8 is the mean of its two halves' (what DDP's averaging computes), and
    the validation values of 9 samples are those of 5 and 4 summed (what the loop sums over the ranks)."""
    from torch.utils.data import default_collate

    from montage.platform.runner import WorkerEnv, build_loop

    cfg = tiny_config(
        "harmonization",
        *EQUIVALENT["harmonization"],
        "tracking.enabled=false",
        "train.batch_size=8",
        f"data.synthetic_val={VAL}",
    )
    loop = build_loop(cfg, WorkerEnv(device=torch.device("cpu")), [])
    batch = next(iter(loop.train_loader))
    whole = _grads(loop, batch)
    assert [k for k, g in whole.items() if g is None] == []
    halves = [_grads(loop, {k: v[i * 4 : i * 4 + 4] for k, v in batch.items()}) for i in (0, 1)]
    for k, g in whole.items():
        mean = (halves[0][k] + halves[1][k]) / 2
        drift = ((g - mean).abs().max() / g.abs().max().clamp(min=1e-8)).item()
        assert drift < 1e-4, f"{k}: the global batch's gradient is {drift:.1e} away from its halves' mean"

    val = default_collate([loop.val_loader.dataset[i] for i in range(VAL)])
    with torch.no_grad():
        one = loop.task.eval_step(loop.m, val)
        ranks = [loop.task.eval_step(loop.m, {k: v[a:b] for k, v in val.items()}) for a, b in ((0, 5), (5, VAL))]
    for k, v in one.items():
        assert v.numel() == VAL, f"val {k}: {v.numel()} values for {VAL} samples"  # one per sample
        assert (ranks[0][k].sum() + ranks[1][k].sum()).item() == pytest.approx(v.sum().item(), rel=1e-5, abs=1e-6), k


def test_shard_sampler_splits_each_global_batch_and_shards_validation_once() -> None:
    one = list(ShardSampler(20, 8, train=True, seed=3))
    ranks = [list(ShardSampler(20, 4, rank=r, world_size=2, train=True, seed=3)) for r in range(2)]
    assert len(one) == 16 and all(len(r) == 8 for r in ranks)  # 2 whole global batches of 8
    for step in range(2):  # step k: rank 0's share + rank 1's share = the single process's batch k
        assert ranks[0][4 * step : 4 * step + 4] + ranks[1][4 * step : 4 * step + 4] == one[8 * step : 8 * step + 8]
    s = ShardSampler(20, 8, train=True, seed=3)
    s.set_epoch(1)
    assert list(s) != one  # a new permutation each epoch
    val = [list(ShardSampler(9, 4, rank=r, world_size=2, train=False)) for r in range(2)]
    assert sorted(val[0] + val[1]) == list(range(9))  # no sample twice, none missing
    with pytest.raises(ValueError, match="cannot be shared"):
        ShardSampler(1, 4, rank=0, world_size=2)


def test_replica_check_catches_diverged_ranks(tmp_path: Path) -> None:
    from montage.platform.replicas import replica_fingerprint
    from montage.platform.task import Modules

    net = torch.nn.Linear(4, 2)
    m = Modules(nets={"net": net}, optimizers={}, schedulers={})
    before = replica_fingerprint(m)
    with torch.no_grad():
        net.weight[0, 0] += 1e-7  # one float32 ulp-scale change
    assert not torch.equal(before, replica_fingerprint(m))


@pytest.fixture(scope="module")
def ddp_runs(ray_session, tmp_path_factory):
    """Three 2-worker segmentation runs under Ray that the tests below share (every Ray fit costs seconds
    of start-up): ``straight`` (2 epochs, untracked), ``paused`` after its first epoch (tracked in
    MLflow), and ``resumed``, the paused run resumed to its end."""
    tmp = tmp_path_factory.mktemp("ddp")

    def config(*overrides: str):
        return _tiny("segmentation", tmp, ["scaling.workers=2", *RESUME, *overrides])

    staged = _staged()
    straight = fit_ray(config("run.name=straight", "tracking.enabled=false"))
    paused = fit_ray(config("run.name=paused", "train.pause_after=1"))
    resumed = fit_ray(config(), resume=str(tmp / "runs" / "paused"))
    assert straight.error is None and paused.error is None and resumed.error is None
    return SimpleNamespace(tmp=tmp, config=config, straight=straight, paused=paused, resumed=resumed,
                           staged_in_tmp=_staged() - staged)  # fmt: skip


def _staged() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("montage-best-*")}


def test_two_worker_fit_checkpoints_and_logs(ddp_runs) -> None:
    """The paused run: what a 2-worker fit reports, keeps and logs."""
    out = ddp_runs.paused
    assert not ddp_runs.staged_in_tmp  # rank 0 staged its best checkpoint in the run folder, not in /tmp
    assert not (ddp_runs.tmp / "runs" / "paused" / ".montage-best").exists()  # and removed it at the end
    assert out.metrics["epoch"] == 1
    assert 0 < out.metrics["time/startup_s"] < 300  # launch → rank 0's first step
    assert out.metrics["mem/peak_rss_mb"] > 50 and out.metrics["time/train_s"] > 0
    assert [c.metrics["epoch"] for c in out.checkpoints] == [1]
    shown = _summary(out)["checkpoints"][0]  # what `montage train` prints per kept checkpoint
    assert shown["epoch"] == 1 and shown["metrics"]["time/train_s"] > 0 and "train/total" in shown["metrics"]
    state = load_checkpoint(out.checkpoint, task="segmentation")
    assert state["epoch"] == 1 and "net" in state["nets"]
    assert not any(k.startswith("module.") for k in state["nets"]["net"])  # saved unwrapped from DDP

    client = mlflow.MlflowClient(ddp_runs.config().tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("montage-segmentation").experiment_id])
    assert len(runs) == 1  # only rank 0 logs (and the resumed run went on in the same MLflow run)
    assert runs[0].data.params["scaling.workers"] == "2"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/iou")] == [1, 2]


def test_resume_under_ray_matches_the_uninterrupted_run(ddp_runs) -> None:
    # the in-process comparison (test_resume) under Ray Train with 2 DDP workers, one MLflow run for both legs
    straight, resumed = ddp_runs.straight, ddp_runs.resumed
    assert ddp_runs.paused.metrics["epoch"] == 1 and resumed.metrics["epoch"] == 2
    assert_resumed_like_straight(straight, resumed, "segmentation")
    lrs = [c.metrics["lr"] for c in straight.checkpoints]
    assert lrs[0] != lrs[1]  # the schedule moved across the resume point

    client = mlflow.MlflowClient(ddp_runs.config().tracking.uri)
    run = client.get_run(resumed.mlflow_run_id)
    assert resumed.mlflow_run_id == ddp_runs.paused.mlflow_run_id and run.info.status == "FINISHED"
    assert sorted(int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch")) == [1, 2]


def test_run_resumed_at_its_end_reports_its_final_epoch(ddp_runs, monkeypatch) -> None:
    """The cause of a resumed sweep's trial shown as stopped after 1 of 2 epochs: its TorchTrainer had
    checkpointed epoch 2 in the moment between Tune's SIGINT and its death, so the resumed trainer found
    nothing to do and reported nothing; Tune kept epoch 1 as the trial's last result. A run resumed at
    its end must report its final metrics again, to whoever listens: the hook every Ray Train worker runs
    (``RayReportHook``), here in this process on the straight run's last checkpoint, with Ray Train's
    ``report`` recorded (nothing is left to train, so no worker group is started for it)."""
    import shutil

    import ray.train

    from montage.launch.train import RayReportHook

    reports: list[dict] = []
    monkeypatch.setattr(
        ray.train, "report", lambda metrics, checkpoint=None: reports.append({**metrics, "ckpt": checkpoint})
    )
    run = ddp_runs.tmp / "runs" / "at-end"
    run.mkdir()
    # what the 2-worker run checkpointed at its end (Ray keeps each checkpoint as a folder)
    shutil.copy(Path(ddp_runs.straight.checkpoint) / FILENAME, run / "latest.pt")
    summary = fit_local(ddp_runs.config("tracking.enabled=false"), resume=run, extra_hooks=[RayReportHook()])
    assert summary.metrics["epoch"] == 2
    assert [(r["epoch"], r["ckpt"]) for r in reports] == [(2.0, None)]  # once, the final epoch, no checkpoint
    assert reports[0]["val/iou"] == pytest.approx(ddp_runs.straight.metrics["val/iou"])
