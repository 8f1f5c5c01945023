"""Object storage that cannot be used fails before any worker starts, naming the bucket or the
credentials (a local S3 endpoint: moto's server, with its IAM checks switched on for the refused keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from cluster_helpers import S3Endpoint

from montage.launch.storage import Storage, StorageError


@pytest.fixture(scope="module")
def s3():
    endpoint = S3Endpoint()
    endpoint.bucket("runs")
    yield endpoint
    endpoint.stop()


@pytest.fixture
def keys(s3, monkeypatch):
    """Switch moto's authentication on (it is process-wide: switched off again after the test) and
    return the keys of an IAM user who may use S3."""
    import boto3

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    iam = boto3.client("iam", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")  # fmt: skip
    user = f"trainer-{len(iam.list_users()['Users'])}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    requests.post(f"{s3.url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    yield key["AccessKeyId"], key["SecretAccessKey"]
    requests.post(f"{s3.url}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def test_a_bucket_that_does_not_exist_is_named(s3, monkeypatch) -> None:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    Storage.of("s3://runs/prefix", s3.url).check()  # the bucket exists: nothing to say
    with pytest.raises(StorageError, match=rf"bucket 'nope' does not exist at {s3.url}; create it first"):
        Storage.of("s3://nope/prefix", s3.url).check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)  # the endpoint from the standard variable
    with pytest.raises(StorageError, match="bucket 'nope' does not exist"):
        Storage.of("s3://nope").check()


def test_refused_credentials_are_named(s3, keys, monkeypatch) -> None:
    key_id, secret = keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    Storage.of("s3://runs/prefix", s3.url).check()  # the user's own keys
    for wrong_id, wrong_secret in (("AKIAUNKNOWNKEY000000", secret), (key_id, "not-the-secret")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        with pytest.raises(StorageError) as refused:
            Storage.of("s3://runs/prefix", s3.url).check()
        text = str(refused.value)
        assert f"access to bucket 'runs' at {s3.url} denied" in text
        assert f"refused the credentials (access key …{wrong_id[-4:]} of AWS_ACCESS_KEY_ID)" in text
        assert wrong_secret not in text


def test_a_training_or_sweep_on_unusable_storage_fails_before_any_worker(s3, keys, tiny_config, monkeypatch) -> None:
    """fit_ray and run_sweep check their storage before a worker (or, for a sweep, Ray) is asked for."""
    from montage.launch import session, train, tune

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was asked for before the storage was checked")

    monkeypatch.setattr(train, "ensure_ray", lambda address=None: None)  # fit_ray joins Ray first: a no-op here
    monkeypatch.setattr(train, "make_trainer", no_ray)
    monkeypatch.setattr(session, "ensure_ray", no_ray)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[1])
    common = ["tracking.enabled=false", f"run.storage_endpoint={s3.url}"]
    with pytest.raises(StorageError, match="bucket 'nope' does not exist"):
        train.fit_ray(tiny_config("segmentation", "run.storage=s3://nope/runs", *common))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match="refused the credentials"):
        train.fit_ray(tiny_config("segmentation", "run.storage=s3://runs/runs", *common))

    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tcfg, base, params = tune.load_tune_config(
        root / "tune_configs" / "segmentation-tiny.yaml", ["storage=s3://runs/tune", f"storage_endpoint={s3.url}"]
    )
    with pytest.raises(StorageError, match="refused the credentials"):
        tune.run_sweep(tcfg, base, params)


def test_a_version_registered_with_its_artifacts_on_object_storage_is_what_serve_loads(
    s3, seg_config, tmp_path, monkeypatch
) -> None:
    """The head's MLflow server keeps artifacts in a bucket (``--artifacts-destination s3://…``,
    ``MLFLOW_S3_ENDPOINT_URL``): a trained checkpoint registered through it lands in the bucket, and
    ``resolve_source`` (what a Serve replica calls) loads that version from there into a predictor."""
    import mlflow
    import numpy as np
    from cluster_helpers import MlflowServer

    from montage.launch.local import fit_local
    from montage.platform.inference import load_predictor
    from montage.tracking.runs import log_checkpoint_model
    from montage.tracking.sources import resolve_source

    s3.bucket("mlflow")
    env = {**s3.env, "MLFLOW_S3_ENDPOINT_URL": s3.url, "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "path"}
    server = MlflowServer(tmp_path / "mlflow", artifacts="s3://mlflow/artifacts", env=env).start()
    try:
        over = ["train.epochs=1", "tracking.log_model=false", "loss.perceptual=0", f"tracking.uri={server.uri}"]
        summary = fit_local(seg_config(*over))
        ckpt = Path(summary.best_checkpoint)
        info = log_checkpoint_model(server.uri, summary.mlflow_run_id, ckpt, "segmentation", {}, "montage-segmentation")
        stored = [k for k in s3.keys("mlflow") if k.endswith(ckpt.name)]
        assert stored, s3.keys("mlflow")  # the checkpoint went through the server into the bucket
        assert not (tmp_path / "mlflow" / "artifacts").exists()  # and nowhere on the server's disk

        resolved = resolve_source(f"models:/montage-segmentation/{info.registered_model_version}", server.uri)
        assert resolved.checkpoint.read_bytes() == ckpt.read_bytes()
        image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        served, local = load_predictor(resolved.checkpoint, device="cpu"), load_predictor(ckpt, device="cpu")
        assert np.array_equal(served([image])[0], local([image])[0])  # the same model answers
        assert mlflow.MlflowClient(server.uri).get_model_version("montage-segmentation", "1").run_id == (
            summary.mlflow_run_id
        )
    finally:
        server.stop()
