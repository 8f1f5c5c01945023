"""The package's layering (pyproject's import-linter contracts) and its lint configuration hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def test_import_contracts_are_kept() -> None:
    out = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_ruff_passes() -> None:
    out = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:]


def test_serving_and_the_cli_import_neither_torchvision_nor_albumentations() -> None:
    """Every Serve replica, Tune trial and ``montage`` command imports the task registry and builds
    models; torchvision (whose ops import torch._dynamo) and albumentations cost ~2.4 s and ~0.7 s of
    CPU in each such process, so they are imported only where a torchvision encoder, a pretrained VGG or
    a dataset is built. (A training process imports torch._dynamo anyway: torch's optimizers do.)"""
    code = """
import sys, torch
import montage.cli, montage.serve.app
from montage.core.registry import TASKS
from montage.platform.imaging import image_grid
from montage.tasks.segmentation.model import SegmentationUNet, SegModelConfig
from montage.tasks.harmonization.model import HarmonizationUNet, HarmModelConfig
from montage.tasks.pix2pix.model import UNetGenerator, GanModelConfig
for task in ("segmentation", "harmonization", "pix2pix"):
    TASKS.get(task)
for encoder in ("tiny", "small"):
    SegmentationUNet(SegModelConfig(encoder=encoder, pretrained=False))
HarmonizationUNet(HarmModelConfig()), UNetGenerator(GanModelConfig())
image_grid([torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 8)])
print(sorted(m for m in ("torchvision", "albumentations") if m in sys.modules))
from montage.tasks.segmentation.data import build_transform
build_transform(None)
print(sorted(m for m in ("torchvision", "albumentations") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "['albumentations']"], out.stdout


def test_serves_ingress_and_the_command_lines_help_import_no_torch() -> None:
    """Serve's ingress replica (``montage.serve.app``: HTTP, decoding, routing, monitoring) runs no
    network, so it imports no torch (~2 s of CPU and ~0.5 GB of memory per replica, paid again at every
    reload and every replica the autoscaler adds); the model deployments import it when they load one.
    Nor does ``montage --help`` or a command line that argparse refuses (0.2 s instead of 2.5 s): the
    errors ``montage`` reports as one line live in ``montage.core.errors``."""
    code = (
        "import sys, contextlib, io, montage.serve.app; print('torch' in sys.modules)\n"
        "from montage.cli import main\n"
        "for argv in (['--help'], ['train', '--no-such-flag']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(argv)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ingress, cli = out.stdout.split()
    assert ingress == "False", "montage.serve.app imports torch"
    assert cli == "False", "montage --help imports torch"
