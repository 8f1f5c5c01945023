"""The names of every ``montage.*`` tag montage writes to MLflow, in one place: run tags, sweep
tags, registry-version tags, logged-model and dataset-input tags (and the key an exported ONNX
file names its parent with). Writers and readers both use these constants; a ``"montage.`` tag
literal anywhere else in the package fails ``tests/test_schema.py``.
"""

from __future__ import annotations

# -- runs -----------------------------------------------------------------------------------------
TASK = "montage.task"  # every run, logged model and export run: the task's name
ROLE = "montage.role"  # what a run is when it is not a training run: sweep | cv | check | export
KIND = "montage.kind"  # evaluation: a `montage evaluate` run
ERROR = "montage.error"  # the exception that ended a run or a trial
STOP_REASON = "montage.stop_reason"  # why training stopped before its last epoch (early stop, budget)
RUN_DIR = "montage.run_dir"  # where the run's checkpoints live: finds the run again on resume
STARTS = "montage.starts"  # times training started in this run (first start, resumes, restarts)
DATA_DIGEST = "montage.data_digest"  # a run's / registered version's training data (the log_inputs digest)
CHECK_PASSED = "montage.check.passed"  # `montage check`: every check passed (true | false)
CV_FOLDS = "montage.cv.folds"  # a cross-validation parent run (or CV trial, or its registered version): its folds
CV_FOLD = "montage.cv.fold"  # one fold's run (and a CV sweep's version: the fold whose checkpoint it is) ...
CV_FOLD_VALUE = "montage.cv.fold_value"  # ... and that fold's own best value

# -- evaluation runs (`montage evaluate`) --------------------------------------------------------
SOURCE = "montage.source"  # the model source it scored, as given
MODEL_NAME = "montage.model_name"  # a registry source: the registered model ...
MODEL_VERSION = "montage.model_version"  # ... and the version it named then

# -- sweeps (one parent run, one child run per trial) ---------------------------------------------
SWEEP = "montage.sweep"  # the sweep's name (parent, trials, and the version a sweep registered)
SWEEP_DIR = "montage.sweep_dir"  # the parent: the sweep's folder (Tune state)
TRIAL = "montage.trial"  # a trial run: Tune's trial id
TRIAL_STATUS = "montage.trial_status"  # finished | stopped early | failed | ...
STOPPED_EARLY = "montage.stopped_early"  # a trial the scheduler stopped (true | false)
INTERRUPTED = "montage.interrupted"  # the parent of a sweep that did not end: why
BEST_TRIAL = "montage.best_trial"  # the parent: the best trial's name

# -- registry versions: how a version was judged ---------------------------------------------------
METRIC = "montage.metric"  # the metric the version was judged on (e.g. val/iou) ...
MODE = "montage.mode"  # ... max | min ...
VALUE = "montage.value"  # ... and its value
SWEEP_PARAMS = "montage.sweep_params"  # the sweep parameters of the trial it came from (YAML flow mapping)
EVALUATION_RUN = "montage.evaluation_run"  # the latest `montage evaluate` run that scored it
ROLLOUT = "montage.rollout"  # promoted | rolled-back | replaced: what a rollout did to the version
ROLLOUT_REASON = "montage.rollout.reason"  # the rules' reasons for it

# -- registry versions: variants (`montage export`, `montage optimize`) ----------------------------
VARIANT = "montage.variant"  # onnx | int8 | fp16 | openvino | openvino-int8 | pruned-<ratio> | sparse-<ratio> | student
RUNTIME = "montage.runtime"  # torch | onnxruntime | openvino: what runs it
PARENT = "montage.parent"  # the source it was made from (also the key in an ONNX file's metadata, an IR's rt_info)
PARAMS = "montage.params"  # parameters of its inference network (a count)
PARENT_PARAMS = "montage.parent_params"
SIZE_MB = "montage.size_mb"
OPSET = "montage.opset"  # ONNX opset
MAX_ABS_DIFF = "montage.max_abs_diff"  # largest |ONNX (or OpenVINO) − PyTorch| on the checked inputs
DYNAMIC_BATCH = "montage.dynamic_batch"  # true | false
OPENVINO_VERSION = "montage.openvino_version"  # an OpenVINO variant: the OpenVINO that wrote its IR
QUALITY_METRIC = "montage.quality_metric"  # measured beside the parent on the parent's validation data:
QUALITY = "montage.quality"
PARENT_QUALITY = "montage.parent_quality"
QUALITY_DELTA = "montage.quality_delta"
LATENCY_MS = "montage.latency_ms"  # p50 at batch 1 on the machine that measured it
PARENT_LATENCY_MS = "montage.parent_latency_ms"
SPEEDUP = "montage.speedup"
PRUNE_MODE = "montage.prune_mode"  # channels | magnitude
PRUNE_RATIO = "montage.prune_ratio"
STUDENT = "montage.student"  # a student's config overrides
DISTILL_WEIGHT = "montage.distill_weight"

RUNTIME_TORCH = "torch"  # values of RUNTIME
RUNTIME_ONNX = "onnxruntime"
RUNTIME_OPENVINO = "openvino"

# -- dataset inputs (`log_inputs`) ----------------------------------------------------------------
DATA_SHA256 = "montage.data.sha256"  # the full fingerprint of the data


def data_samples(split: str) -> str:
    """A dataset input's sample count of ``split`` (``montage.data.train_samples``)."""
    return f"montage.data.{split}_samples"


def logged_metric(metric: str) -> str:
    """A logged model's tag holding the value of ``metric`` it was logged with (``montage.val/iou``)."""
    return f"montage.{metric}"
