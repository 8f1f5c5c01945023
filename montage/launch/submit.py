"""``montage submit``: run a montage command as a Ray job on a cluster (JobSubmissionClient)."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from typing import Any

log = logging.getLogger(__name__)

AGENT_WAIT_S = 120

EXCLUDES = [".venv", ".git", "runs", "mlartifacts", "mlruns.db", "demo_out", "**/__pycache__", "*.egg-info"]
# MLflow basic-auth credentials (cluster.yaml runs the server with --app-name basic-auth) travel with the job
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def submit(
    command: list[str],
    address: str,
    working_dir: str = ".",
    tracking_uri: str = "",
    follow: bool = True,
    python: str = "python",
) -> int:
    """Submit ``montage <command>`` with the working dir and environment; stream its logs
    and return 0 when the job succeeded (1 otherwise)."""
    if "RAY_AUTH_TOKEN" in os.environ or os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60 clusters start with token auth; read at import
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    client = JobSubmissionClient(address)
    entrypoint = f"{shlex.quote(python)} -m montage " + " ".join(shlex.quote(c) for c in command)
    runtime_env: dict[str, Any] = {"env_vars": env}
    if working_dir:  # empty: run where montage is installed on the head (paths then as the head sees them)
        runtime_env.update(working_dir=working_dir, excludes=EXCLUDES)
    deadline = time.time() + AGENT_WAIT_S
    while True:  # a head that has just started refuses jobs until its job agent is up
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            log.info("the cluster's job agent is not up yet: retrying")
            time.sleep(2)
    log.info("submitted %s as %s to %s", entrypoint, job_id, address)
    if follow:
        asyncio.run(_tail(client, job_id))
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(1)
    log.info("job %s %s", job_id, status.value)
    return 0 if status == JobStatus.SUCCEEDED else 1


async def _tail(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
