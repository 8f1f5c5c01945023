from pathlib import Path

import pytest
import yaml

from montage.core.config import (
    ConfigError,
    apply_overrides,
    defaults_of,
    flatten,
    load_config,
    load_file,
    parse_override,
    to_dict,
)
from montage.core.registry import TASKS, Registry, UnknownNameError

SPEC = TASKS.get("segmentation").spec


def test_defaults_file_and_overrides_resolve_in_order(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"task": "segmentation", "train": {"epochs": 7, "batch_size": 4}, "loss": {"dice": 2}}))
    cfg = load_config(
        "segmentation", SPEC, f, ["train.epochs=3", "loss.edge=0.1", "model.decoder_channels=[8,8,8,8,8]"]
    )
    assert cfg.train.epochs == 3  # override beats file
    assert cfg.train.batch_size == 4  # file beats default
    assert cfg.loss.dice == 2.0 and isinstance(cfg.loss.dice, float)  # int accepted for float
    assert cfg.loss.edge == 0.1
    assert cfg.model.decoder_channels == [8, 8, 8, 8, 8]
    assert cfg.optim.name == "adamw"  # task default over the platform default
    assert cfg.optim.betas == (0.9, 0.999)


def test_bare_off_is_the_word_not_a_bool(tmp_path: Path) -> None:
    # YAML 1.1 reads `off` as False: a choice spelled "off" must still work, on the command line and in files
    assert load_config("segmentation", SPEC, None, ["train.amp=off", "train.compile=off"]).train.amp == "off"
    f = tmp_path / "c.yaml"
    f.write_text("task: segmentation\ntrain:\n  amp: off\n  compile: off\n")
    cfg = load_config("segmentation", SPEC, f, [])
    assert (cfg.train.amp, cfg.train.compile) == ("off", "off")
    with pytest.raises(ConfigError, match="train.amp: True is not one of"):
        load_config("segmentation", SPEC, None, ["train.amp=on"])  # no "on" choice: still an error


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=three", "train.epochs: expected int"),
        ("train.epochs=1.5", "train.epochs: expected int"),
        ("train.amp=fp8", "train.amp: 'fp8' is not one of"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("train.epochs=0", "epochs must be >= 1"),
        ("model.encoder=resnet99", "unknown encoder 'resnet99'; valid: resnet18, resnet34, resnet50, small, tiny"),
        ("data.source=cocoo", "data.source: unknown mask source 'cocoo'; valid: coco, folder, supervisely, synthetic"),
        ("train.epochs.x=1", "config key 'train.epochs' is a value, not a section"),
        ("train", "not of the form key=value"),
        ("data.augment.hflip=yes", "data.augment.hflip: expected float"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config("segmentation", SPEC, None, [override])
    assert message in str(err.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("segmentation", SPEC, tmp_path / "missing.yaml")
    other = tmp_path / "other.yaml"
    other.write_text("task: pix2pix\n")
    with pytest.raises(ConfigError, match="config is for task 'pix2pix', not 'segmentation'"):
        load_config("segmentation", SPEC, other)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config("segmentation", SPEC, bad)


def test_override_values_are_yaml() -> None:
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=x=y") == ("a", "x=y")


def test_round_trip_and_flatten() -> None:
    cfg = load_config("segmentation", SPEC, None, ["train.epochs=2"])
    tree = to_dict(cfg)
    again = load_config("segmentation", SPEC, None, [])
    assert to_dict(again) != tree  # epochs differ
    flat = flatten(tree)
    assert flat["train.epochs"] == 2 and flat["loss.bce"] == 1.0 and flat["task"] == "segmentation"


def test_one_loader_for_every_config_file_type(tmp_path: Path) -> None:
    from montage.core.serve_sections import ServeConfig, load_serve_config
    from montage.core.tune_sections import TuneConfig

    tune = defaults_of(TuneConfig)
    assert "task" not in tune and "base" not in tune  # required: no default to start from
    assert tune["scheduler"] == {"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 0}
    serve = defaults_of(ServeConfig)
    assert serve == to_dict(ServeConfig()) and serve["pix2pix"]["enabled"] is False
    f = tmp_path / "serve.yaml"
    f.write_text("port: 9000\nsegmentation:\n  rollout:\n    traffic: 0.2\n")
    cfg = load_file(ServeConfig, f, ["harmonization.autoscaling.max_replicas=4"])
    assert (cfg.port, cfg.segmentation.rollout.traffic, cfg.harmonization.autoscaling.max_replicas) == (9000, 0.2, 4)
    assert cfg == load_serve_config(f, ["harmonization.autoscaling.max_replicas=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'cros' \(valid here: segmentation, .*, cors,"):
        apply_overrides(defaults_of(ServeConfig), ["cros.allow_origins=[x]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'cors.origins' \(valid in cors: allow_origins\)"):
        load_file(ServeConfig, None, ["cors.origins=[x]"])


def test_registry_lists_valid_names() -> None:
    reg: Registry = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(UnknownNameError, match="unknown widget 'b'; valid widgets: a"):
        reg.get("b")
    with pytest.raises(UnknownNameError, match="valid tasks: .*segmentation"):
        TASKS.get("nope")


def test_config_reference_is_current() -> None:
    from pathlib import Path

    from montage.cli.reference import reference

    doc = (Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md").read_text()
    assert doc == reference(), "docs/CONFIG.md is stale: python -m montage.cli.reference > docs/CONFIG.md"
    assert "`loss.dice` | `float` | `1.0`" in doc and "`optim.lr_d`" in doc
    # every config file type: training, tune (required keys marked) and serve, with the fields' comments
    assert "| `base` | `str` | (required) | training config:" in doc and "`scheduler.grace_period`" in doc
    assert (
        "`<model>.runtime`" in doc
        and "`monitoring.psi_threshold`" in doc
        and "`pix2pix` changes `enabled=False`" in doc
    )
