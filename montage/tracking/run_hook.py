"""The training loop's MLflow hook: what a training logs to its run (params, per-epoch metrics, sample
grids, the best checkpoint as a model), and the offline outbox that keeps it while the server is away.
The run's lifecycle (find, open, end) is :mod:`montage.tracking.runs`."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from montage.core import schema
from montage.core.config import ExperimentConfig
from montage.platform.loop import Hook, Loop
from montage.tracking.datasets import log_data_input, split_sizes
from montage.tracking.outbox import OUTBOX, Backoff, Mirror, Outbox, unreachable
from montage.tracking.runs import create_run, log_checkpoint_model, mark_failed, run_client, run_dir_of

log = logging.getLogger(__name__)


class MlflowHook(Hook):
    """Logs a training run to MLflow: the run the launcher opened (``tracking.run_id``), the one
    saved in the checkpoint when resuming, or a new one. Epochs already in the run's history (an
    epoch redone after a restart) are not logged twice. With ``outbox_dir`` (the run folder), what
    the server cannot take while it is away waits in an :class:`~montage.tracking.outbox.Outbox`
    there and is sent when it is back: training goes on either way. With ``outbox_mirror`` (the run
    folder on object storage), ``outbox_dir`` is the worker's working copy and the mirror holds the
    records for whoever continues the run."""

    key = "mlflow"

    def __init__(
        self,
        cfg: ExperimentConfig,
        tags: dict[str, str] | None = None,
        best_path: str | Path | None = None,
        outbox_dir: str | Path | None = None,
        outbox_mirror: Mirror | None = None,
    ) -> None:
        self.cfg = cfg
        self.tags = dict(tags or {})
        self.best_path = Path(best_path) if best_path else None
        self.outbox_dir = Path(outbox_dir) / OUTBOX if outbox_dir else None
        self.outbox_mirror = outbox_mirror
        self.outbox: Outbox | None = None
        self.backoff = Backoff(cfg.tracking.retry_s, cfg.tracking.retry_max_s)
        self.run_id: str | None = None
        self.client: Any = None
        self.attached = False
        self.stale = False
        self.logged_epochs: set[int] = set()
        self.ended, self.start_epoch = False, 0
        self.splits: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id or ""}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or None

    def before_train(self, loop: Loop) -> None:
        self.client = run_client(self.cfg)
        self.splits = split_sizes(loop)  # for the run's log_inputs when it attaches
        self.run_id = self.run_id or self.cfg.tracking.run_id or None
        if self.outbox_dir is None:
            self._attach()
            return
        self.outbox = Outbox(self.outbox_dir, self.cfg.tracking.outbox_limit, self.outbox_mirror)
        # a session that ended with its records queued, resumed at its end (nothing left to train): those
        # records say how the run ended, none are added
        self.ended = loop.epoch > 0 and any(r["kind"] == "end" for r in self.outbox.records)
        self.start_epoch = loop.epoch
        try:
            self._attach()
            self._flush()
        except Exception as exc:  # noqa: BLE001 - only an absent server is survived; others re-raise
            self._away(exc)

    def _attach(self) -> None:
        """Find (or create) the run, mark it RUNNING, learn which epochs it holds, count this start."""
        self.run_id = self.run_id or create_run(self.cfg, {schema.RUN_DIR: run_dir_of(self.cfg), **self.tags})
        run = self.client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        self.logged_epochs = {int(m.step) for m in self.client.get_metric_history(self.run_id, "epoch")}
        if self.logged_epochs:
            log.info("continuing MLflow run %s (epochs %d–%d logged)", self.run_id, min(self.logged_epochs),
                     max(self.logged_epochs))  # fmt: skip
        self.client.set_tag(self.run_id, schema.STARTS, str(int(run.data.tags.get(schema.STARTS, "0") or 0) + 1))
        if not run.inputs.dataset_inputs:  # once per run (a resume or restart logs nothing new)
            log_data_input(self.client, self.run_id, self.cfg, self.splits)
        self.attached = True

    def after_epoch(self, loop: Loop, metrics: dict[str, float]) -> None:
        record = {
            "kind": "epoch",
            "epoch": loop.epoch,
            "time_ms": int(time.time() * 1000),
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        }
        if loop.sample_image is not None:
            record["artifact_file"] = f"samples/epoch_{loop.epoch:03d}.png"
        self._deliver(record, loop.sample_image)

    def after_train(self, loop: Loop) -> None:
        if self.ended and loop.epoch == self.start_epoch:
            self._drain()
            return
        if self.cfg.tracking.log_model and self.best_path is not None and self.best_path.is_file():
            self._deliver({"kind": "model", "metric": loop.best.metric, "value": loop.best.value}, model=True)
        if loop.stop_reason:
            self._deliver({"kind": "tag", "key": schema.STOP_REASON, "value": loop.stop_reason})
        self._deliver({"kind": "end", "status": "FINISHED"})
        self._drain()

    def on_error(self, loop: Loop, exc: BaseException) -> None:
        if self.client is None or self.run_id is None:
            return
        try:
            mark_failed(self.client, self.run_id, exc)
        except Exception as err:  # noqa: BLE001 - the training's own error is what matters here
            log.warning("could not mark MLflow run %s failed: %s", self.run_id, err)

    def log_model(self, checkpoint: Path, metric: str, value: float | None) -> None:
        log_checkpoint_model(self.cfg.tracking.uri, self.run_id, checkpoint, self.cfg.task, {metric: value})

    # ------------------------------------------------------------------ sending, or queueing when away

    def _deliver(self, record: dict[str, Any], image: Any = None, model: bool = False) -> None:
        if self.outbox is None:
            self._send(record, image, self.best_path if model else None)
            return
        if not self.outbox and self.attached and self.backoff.due():
            try:
                self._send(record, image, self.best_path if model else None)
                return
            except Exception as exc:  # noqa: BLE001
                self._away(exc)
        # a model record keeps a copy of the weights it names: a staging folder may be gone when it is sent
        self.outbox.add(record, image, attachment=self.best_path if model else None)
        if self.backoff.due():
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001
                self._away(exc)

    def _send(self, record: dict[str, Any], image: Any, checkpoint: Path | None) -> None:
        """One record to the server: ``image`` an array or a PNG path, ``checkpoint`` a best.pt."""
        from mlflow.entities import Metric

        kind = record["kind"]
        if kind == "epoch":
            if record["epoch"] in self.logged_epochs:  # redone after a restart: the first record stands
                return
            ms = [Metric(k, v, record["time_ms"], record["epoch"]) for k, v in record["metrics"].items()]
            self.client.log_batch(self.run_id, metrics=ms)
            self.logged_epochs.add(record["epoch"])
            if isinstance(image, Path):
                with tempfile.TemporaryDirectory() as tmp:
                    named = Path(tmp) / Path(record["artifact_file"]).name
                    named.write_bytes(image.read_bytes())
                    self.client.log_artifact(self.run_id, str(named), str(Path(record["artifact_file"]).parent))
            elif image is not None:
                self.client.log_image(self.run_id, image, artifact_file=record["artifact_file"])
        elif kind == "model":
            path = checkpoint or self.outbox.path(record, "file")
            self.log_model(path, record["metric"], record["value"])
        elif kind == "tag":
            self.client.set_tag(self.run_id, record["key"], record["value"])
        elif kind == "end":
            self.client.set_terminated(self.run_id, record["status"])

    def _flush(self) -> None:
        """Send the outbox in order (attaching to the run first if the server was away at the start)."""
        if self.outbox is None or (self.attached and not self.outbox):
            self.backoff.succeeded()
            return
        away = self.backoff.failing_since
        if not self.attached:
            self._attach()
        elif self.stale:
            self.logged_epochs = {int(m.step) for m in self.client.get_metric_history(self.run_id, "epoch")}
        self.stale = False

        sent = self.outbox.flush(lambda record, image: self._send(record, image, None))
        if away is not None:
            log.warning("MLflow at %s answers again after %.0f s: sent %d queued record(s)", self.cfg.tracking.uri,
                        time.monotonic() - away, sent)  # fmt: skip
        self.backoff.succeeded()

    def _away(self, exc: BaseException) -> None:
        if self.outbox is None or not unreachable(exc):
            raise exc
        self.backoff.failed()
        self.stale = True  # a request that timed out may have landed: re-read the history before resending
        log.warning(
            "MLflow at %s does not answer (%s): training goes on; %d record(s) pending in %s%s, next try in %.0f s",
            self.cfg.tracking.uri, str(exc).splitlines()[0][:200], len(self.outbox), self.outbox.where,
            f" ({self.outbox.dropped} dropped: outbox full)" if self.outbox.dropped else "", self.backoff.delay,
        )  # fmt: skip

    def _drain(self) -> None:
        """At the end of training: wait up to ``tracking.drain_s`` for the server to take the outbox."""
        if self.outbox is None:
            return
        deadline = time.monotonic() + self.cfg.tracking.drain_s
        while (self.outbox or not self.attached) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self.backoff.next_try, deadline) - time.monotonic()))
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001
                self._away(exc)
        if self.outbox or not self.attached:
            log.error(
                "MLflow at %s still does not answer: %d record(s) of this run wait in %s; they are sent first "
                "when the run continues (its next restart, or `montage train %s --resume %s`)",
                self.cfg.tracking.uri, len(self.outbox), self.outbox.where, self.cfg.task, run_dir_of(self.cfg),
            )  # fmt: skip
