"""Promotion rules of the model registry: a better candidate moves ``@champion``, a worse one
does not, min-mode metrics (fMSE, L1, loss) compare the right way, ``promote=always|never``
override the comparison."""

from __future__ import annotations

from functools import partial

import pytest

from montage.launch.local import fit_local
from montage.tracking import registry as reg


def test_promotion_rules(tiny_config) -> None:
    base = tiny_config("segmentation")
    fit = fit_local(tiny_config("segmentation", "run.name=a", "train.max_steps=1", "tracking.log_model=false"))
    register = partial(reg.register_checkpoint, base, fit.best_checkpoint, fit.mlflow_run_id, sweep="manual", params={})

    def champion() -> str:
        return str(reg.champion("segmentation", base.tracking.uri).version)

    # min mode: lower is better
    assert register(metric="val/loss", mode="min", value=0.5).promoted  # no champion yet
    assert not register(metric="val/loss", mode="min", value=0.7).promoted and champion() == "1"  # worse
    assert register(metric="val/loss", mode="min", value=0.3).promoted and champion() == "3"  # better
    assert (
        not register(metric="val/loss", mode="min", value=0.3).promoted and champion() == "3"
    )  # a tie keeps the champion
    # the user's word wins over the comparison
    assert register(metric="val/loss", mode="min", value=0.9, promote="always").promoted and champion() == "5"
    assert not register(metric="val/loss", mode="min", value=0.01, promote="never").promoted and champion() == "5"
    versions = reg.list_versions("segmentation", base.tracking.uri)
    assert [str(v.version) for v in versions] == ["1", "2", "3", "4", "5", "6"]
    assert versions[5].tags["montage.value"] == "0.01" and versions[5].tags["montage.mode"] == "min"


@pytest.mark.parametrize(
    "value, mode, old, expected",
    [
        (0.6, "max", 0.5, True),
        (0.4, "max", 0.5, False),
        (0.4, "min", 0.5, True),
        (0.6, "min", 0.5, False),
        (0.5, "max", 0.5, False),
    ],
)
def test_beats_compares_in_the_metric_direction(value: float, mode: str, old: float, expected: bool) -> None:
    class Version:
        tags = {"montage.metric": "val/x", "montage.value": repr(old)}

    assert reg.beats(value, mode, "val/x", Version()) is expected
    assert reg.beats(value, mode, "val/x", None)  # no champion: any candidate
