"""Shared fixtures: one Ray session per test run, the packaged smoke configs (``<task>-smoke.yaml``)
and tiny recipes under tmp_path, temp MLflow stores."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from stores import mlflow_store

# Everything the run's processes put in the temp folder lands in one folder of its own, removed at the end:
# what libraries leave there (multiprocessing's pymp-*, MLflow's db_init_lock-*, the folders of a process a
# test kills on purpose) and the session folders of every Ray the run starts (Ray keeps them forever, a few
# hundred MB a run) never stay in /tmp. Ray's socket paths stay under Linux's 107 characters (≤ 97 here).
# Under pytest-xdist each worker process gets a folder of its own inside the run's (``gw0``, ``gw1``): the
# ``ray_current_cluster`` file a `ray start` head writes there is then seen by that worker's processes only.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and os.environ.get("MONTAGE_TESTS_TMP"):
    RUN_TMP = os.path.join(os.environ["MONTAGE_TESTS_TMP"], _WORKER)
    os.makedirs(RUN_TMP, exist_ok=True)
else:
    RUN_TMP = tempfile.mkdtemp(prefix="montage-tests-")
    os.environ["MONTAGE_TESTS_TMP"] = RUN_TMP
os.environ["TMPDIR"] = os.environ["RAY_TMPDIR"] = RUN_TMP
tempfile.tempdir = None  # gettempdir() reads TMPDIR again

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s, so every fit's tear-down waits up to that
# long; a faster poll saves ~1 s per Ray fit and changes nothing a test checks
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train starts a preemption watcher actor per fit (a process that imports Ray Train, ~1.5 s of CPU) to
# notice nodes being drained; no test drains a node (the lost-node tests kill or remove theirs at once)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's own Prometheus metrics (controller state, workers' report times: two callbacks per fit that
# record and push them); no test reads them (montage's monitoring is Serve's), and off a fit costs ~1.5 CPU-s less
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
# Ray runs its workers at nice 15: beside the other pytest-xdist worker's in-process training (nice 0) they
# would get a few percent of a core, and every Ray test would wait on them
os.environ.setdefault("RAY_worker_niceness", "0")
# Under pytest-xdist each worker gets its share of the cores for torch's (OpenMP) threads: two workers
# each running two spinning threads on two cores made the in-process trainings 3-5x slower than alone
if _WORKER:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_threads)
os.environ.setdefault("RAY_AUTH_MODE", "token")  # clients of a `ray start` head (Ray reads it at import)
# Token auth needs a token: `ray start` (the job-submission and multi-node heads, which start before the shared
# session) refuses to start without one, and only ray.init makes one, in ~/.ray/auth_token. One token for the
# run, in the environment that every head, client and worker of the run inherits; nothing written to the home
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def pytest_unconfigure(config) -> None:
    shutil.rmtree(RUN_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run (start-up costs seconds). With its dashboard, as every Ray that
    montage starts or joins has: Ray Train's ``PlacementGroupCleaner`` asks the dashboard's State API
    whether a training's controller still lives, and without one it never removes the placement group
    of a training that died ungracefully (a trial Tune stopped, a killed sweep), so their CPUs stay
    reserved for the rest of the session and later fits, sweeps and Serve replicas wait forever.

    The cleaner asks the State API without an address, and with another Ray on the machine (a test
    cluster, a job-submission head) that lookup fails ("Found multiple active Ray instances"), the
    cleaner's thread dies and the group stays. So the session's processes (its raylet, and through it
    every worker and job driver it starts) are told their own dashboard (``RAY_API_SERVER_ADDRESS``,
    which the State API reads first); this process is not, so that a test's subprocess starting a Ray
    of its own does not inherit it."""
    import ray
    from cluster_helpers import api_server_env, free_port

    if not ray.is_initialized():
        port = free_port()
        env = api_server_env(f"127.0.0.1:{port}")
        os.environ.update(env)
        try:
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=True,
                dashboard_port=port,
                logging_level="WARNING",
                log_to_driver=False,
            )
        finally:
            for name in env:
                del os.environ[name]
        # Ray's log monitor forwards the workers' output to a driver that does not take it (log_to_driver
        # is off) and rescans the session's growing log folder ten times a second: ~57 s of CPU over a full
        # run here. ray.init cannot leave it out (`ray start --include-log-monitor=false` can): stopped
        ray._private.worker._global_node.kill_log_monitor()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def no_placement_group_outlives_its_module(request):
    """After each module on the shared Ray: every placement group is removed within a minute (Ray Train's
    cleaner needs a few seconds for a training that died ungracefully), or the module errors, naming the
    groups, instead of a later module hanging on the CPUs they hold."""
    yield
    from cluster_helpers import live_placement_groups, wait_placement_groups_removed

    if live_placement_groups() is not None:
        wait_placement_groups_removed(60, request.module.__name__)


@pytest.fixture
def s3_endpoint(monkeypatch):
    """moto's S3 server for one test (``cluster_helpers.S3Endpoint``), its credentials in the environment."""
    from cluster_helpers import S3Endpoint

    endpoint = S3Endpoint()
    for k, v in endpoint.env.items():
        monkeypatch.setenv(k, v)
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="session")
def serve_port(ray_session):
    """The HTTP port of the run's one Serve instance (its controller and proxy) on the shared session. The
    modules that deploy an application (test_monitoring, test_rollout, and ``serve_app``) deploy it on this
    port and delete it when they are done (``serve_helpers.delete_app``) instead of starting and shutting down
    Serve each time (a cycle of ~6 s here); the session's end shuts Serve down."""
    from serve_helpers import free_port, stop_serve

    yield free_port()
    stop_serve()


@pytest.fixture(scope="session")
def serve_app(serve_port, tmp_path_factory):
    """The Serve application test_serve and test_serve_hardening share (``serve_helpers.SharedApp``);
    test_serve_hardening deletes it when it is done, else the session's end does."""
    from serve_helpers import SharedApp

    app = SharedApp(tmp_path_factory.mktemp("serve"), serve_port)
    yield app
    app.stop()


@dataclass
class Sweep:
    """A finished sweep: its folder, tracking URI, ``SweepResult``, and the ``montage-best-*`` folders in
    the temp folder before and after it."""

    tmp: Path
    uri: str
    result: Any
    staged_before: set[str]
    staged_after: set[str]


@pytest.fixture(scope="session")
def harmonization_sweep(ray_session, tmp_path_factory) -> Sweep:
    """One tiny harmonization sweep for test_tune and test_report (a sweep's trials cost a Ray Train fit
    each): two trials one after the other, the recipe's learning rate for 3 epochs, then a learning rate
    that wrecks the model, which ASHA stops at its first rung (epoch 1) for being worse than the first.
    The sweep registers its best trial as version 1 of ``montage-harmonization``, the store's only one."""
    import yaml

    from montage.launch.tune import load_tune_config, run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    uri = mlflow_store(tmp)
    cfg = {
        "task": "harmonization",
        "base": "harmonization-smoke",
        "overrides": ["train.epochs=3", f"tracking.artifacts={tmp / 'mlartifacts'}", f"tracking.uri={uri}"],
        "num_samples": 2,
        "search_space": {
            "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 10.0},
            "loss.mse": {"type": "uniform", "low": 0.5, "high": 1.5},
        },
        "points_to_evaluate": [{"optim.lr": 0.003, "loss.mse": 1.0}, {"optim.lr": 10.0, "loss.mse": 1.5}],
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
        "storage": str(tmp / "tune"),
        "max_concurrent": 1,
        "name": "rep",
    }
    (tmp / "t.yaml").write_text(yaml.safe_dump(cfg))

    def staged() -> set[str]:
        return {p.name for p in Path(tempfile.gettempdir()).glob("montage-best-*")}

    before = staged()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = run_sweep(*load_tune_config(tmp / "t.yaml"))
    return Sweep(tmp, uri, result, before, staged())


@pytest.fixture
def seg_config(tmp_path: Path):
    """A tiny synthetic segmentation config writing runs and MLflow under tmp_path."""

    def make(*overrides: str):
        return _tiny("segmentation", tmp_path, overrides)

    return make


def _tiny(task: str, tmp_path: Path, overrides, recipe: str = "smoke"):
    """The packaged ``<task>-<recipe>.yaml`` with its runs and MLflow store under tmp_path."""
    from montage.core.config import load_config
    from montage.core.paths import packaged_config
    from montage.core.registry import TASKS

    return load_config(
        task,
        TASKS.get(task).spec,
        packaged_config(f"{task}-{recipe}"),
        [
            f"run.storage={tmp_path / 'runs'}",
            f"tracking.uri={mlflow_store(tmp_path)}",
            f"tracking.artifacts={tmp_path / 'mlartifacts'}",
            *overrides,
        ],
    )


@pytest.fixture
def tiny_config(tmp_path: Path):
    """``tiny_config(task, *overrides)``: a tiny synthetic config of any task under tmp_path."""

    def make(task: str, *overrides: str):
        return _tiny(task, tmp_path, overrides)

    return make


@pytest.fixture
def recipe_config(tmp_path: Path):
    """``recipe_config(task, *overrides)``: the packaged ``<task>-tiny.yaml`` recipe (what the demo
    trains) in one process under tmp_path, at the global batch of its configured workers."""

    def make(task: str, *overrides: str):
        from montage.launch.local import as_one_process

        return as_one_process(
            _tiny(task, tmp_path, ["train.progress=false", "tracking.enabled=false", *overrides], recipe="tiny")
        )

    return make


# the modules that start Ray clusters of their own (`ray start` heads, Ray's multi-node test clusters): never
# in a process that holds the shared session (the two would contend for the dashboard agent's ports)
OWN_CLUSTERS = {"test_jobs.py": 0, "test_multinode.py": 1}
# the shared Serve application (serve_app): test_serve, then test_serve_hardening, which deletes it, after
# the modules that deploy an application of their own (one at a time on the run's Serve: each takes the route /)
LAST = {"test_serve.py": 3, "test_serve_hardening.py": 4}
# the modules on the shared Ray session (ray_session, serve_app): one pytest-xdist worker runs them all
ON_SESSION = {
    "test_data_check_ray.py", "test_distributed.py", "test_monitoring.py", "test_ray_train.py",
    "test_report.py", "test_rollout.py", "test_serve.py", "test_serve_hardening.py", "test_toolbox_ray.py",
    "test_tune.py", "test_tune_resume.py",
}  # fmt: skip


# modules whose tests share what a module-scoped fixture made once (ONNX exports): one worker runs them all
TOGETHER = {"test_export.py"}


def _rank(module: str) -> int:
    """Where a module's tests go in the run's order: the own-cluster modules, the shared session's, the
    session's last two (``LAST``), then every other module."""
    if module in OWN_CLUSTERS:
        return OWN_CLUSTERS[module]
    return LAST.get(module, 2 if module in ON_SESSION else 5)


def _worker_group(nodeid: str) -> str:
    """The pytest-xdist work unit of a test: ``ray`` (the shared session's modules, one worker, in
    order), ``clusters`` (the modules with clusters of their own, the other worker, first), its module
    (``TOGETHER``), or the test alone (it starts no Ray: whichever worker is free)."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    if module in TOGETHER:
        return module
    return "ray" if module in ON_SESSION else "clusters" if module in OWN_CLUSTERS else nodeid


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's loadscope scheduling over ``_worker_group`` (its own ``--dist loadgroup`` sets a node
    id attribute that pytest 9 no longer reads, so its groups are ignored). Its work units are taken in the
    collection's order (``_rank``), not largest first: the first two, ``clusters`` and ``ray``, go to the
    two workers at the start, and neither worker asks for another unit while more than two of its tests
    are pending, so the two never share a process (largest first, a ``TOGETHER`` module of more tests
    than ``clusters`` went ahead of it)."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _worker_group(nodeid)

    return ByGroup(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    """The order of the tests, and a check that ``ON_SESSION`` names every module on the shared session.
    On one process (``pytest -n 0``) the own-cluster modules run first, before the shared session starts;
    under pytest-xdist this order makes ``clusters`` and ``ray`` the first two work units (``ByGroup``)."""
    items.sort(key=lambda item: _rank(item.path.name))
    on_session = {item.path.name for item in items if {"ray_session", "serve_app"} & set(item.fixturenames)}
    if on_session - ON_SESSION:
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(on_session - ON_SESSION)} to ON_SESSION")
    for item in items:
        if item.path.name not in ON_SESSION:
            item.add_marker(pytest.mark.no_ray_in_process)


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _writes_nothing_into_the_repository(request):
    """What a test writes goes under tmp_path: a new top-level entry of the repository (MLflow's default
    ``./mlruns``, a ``runs/`` folder, ...) fails the test that was running when it appeared."""
    before = set(os.listdir(REPO))
    yield
    new = sorted(n for n in set(os.listdir(REPO)) - before if not n.startswith("."))
    if new:
        pytest.fail(
            f"{new} appeared in the repository ({REPO}) while this test ran (under pytest-xdist it may be the "
            "other worker's test): write under tmp_path"
        )


@pytest.fixture(autouse=True)
def _starts_no_ray_in_process(request):
    """A test outside the shared session's modules must not start Ray in the test process (under
    pytest-xdist it may run in the worker that starts clusters of its own, and clash with them)."""

    def running() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()

    before = running()
    yield
    if request.node.get_closest_marker("no_ray_in_process") and running() and not before:
        sys.modules["ray"].shutdown()
        pytest.fail(f"{request.node.path.name} started Ray in the test process: use the ray_session fixture")
