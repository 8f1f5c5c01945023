"""Pruning a task's network, and rebuilding a pruned network from its weights.

- :func:`prune_channels`: structured channel pruning with Torch-Pruning's dependency graph
  (``BasePruner`` + ``GroupMagnitudeImportance``): coupled layers (residual adds, UNet skip
  concatenations, norms, transposed convolutions) lose the same channels, so the network stays
  consistent and really gets narrower (fewer FLOPs, smaller tensors).
- :func:`prune_magnitude`: unstructured global L1 magnitude pruning with
  ``torch.nn.utils.prune``, made permanent (zeros in dense weights: smaller when compressed,
  no faster on dense kernels).
- :func:`conform`: a network built from its config reshaped to the layer widths of a state
  dict (a pruned checkpoint), so checkpoints stay plain tensors read with
  ``torch.load(weights_only=True)`` — Torch-Pruning's own save format pickles modules.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class PruneReport:
    method: str  # channels | magnitude
    ratio: float
    params_before: int
    params_after: int
    channels_before: int  # output channels of every convolution, summed
    channels_after: int
    zeros: float  # fraction of convolution weights that are exactly zero


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def conv_channels(net: nn.Module) -> int:
    return sum(m.out_channels for m in net.modules() if isinstance(m, _CONVS))


def zero_fraction(net: nn.Module) -> float:
    weights = [m.weight for m in net.modules() if isinstance(m, _CONVS)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(1, total)


def output_layers(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[nn.Module]:
    """Layers whose output width is fixed by the network's contract: the last layer run (the
    head: its channels are what the network returns), every 1-channel convolution (e.g. an
    attention gate's ψ) and those a submodule lists in its ``fixed_width_layers()``."""
    order: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in net.modules()
        if isinstance(m, (*_CONVS, nn.Linear))
    ]
    try:
        with torch.no_grad():
            net.eval()(*inputs)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(f"{type(net).__name__} runs no convolution or linear layer: nothing to prune")
    fixed = [order[-1]] + [m for m in order if getattr(m, "out_channels", 0) == 1]
    for m in net.modules():  # layers a network declares fixed (e.g. read by a path the tracer does not follow)
        declared = getattr(m, "fixed_width_layers", None)
        if callable(declared):
            fixed += list(declared())
    return list(dict.fromkeys(fixed))


def _fix_group_norms(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups:
            m.num_groups = math.gcd(m.num_groups, m.num_channels)


def prune_channels(
    net: nn.Module, inputs: tuple[torch.Tensor, ...], ratio: float, round_to: int | None = None
) -> PruneReport:
    """Remove ``ratio`` of the channels of every prunable layer group of ``net`` (in place),
    the groups' L2 weight magnitude deciding which."""
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise ValueError(f"the pruning ratio must be in (0, 1), got {ratio}")
    before = (count_params(net), conv_channels(net))
    ignored = output_layers(net, inputs)
    net.eval()
    pruner = tp.pruner.BasePruner(
        net,
        inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
    )
    pruner.step()
    _fix_group_norms(net)
    report = PruneReport(
        "channels", ratio, before[0], count_params(net), before[1], conv_channels(net), zero_fraction(net)
    )
    log.info(
        "pruned %.0f %% of the channels: %d → %d parameters, %d → %d conv channels",
        ratio * 100,
        before[0],
        report.params_after,
        before[1],
        report.channels_after,
    )
    return report


def prune_magnitude(net: nn.Module, inputs: tuple[torch.Tensor, ...], ratio: float) -> PruneReport:
    """Zero the ``ratio`` of convolution weights smallest in magnitude over the whole network
    (global L1; the output layers are left whole), in place and permanently."""
    from torch.nn.utils import prune

    if not 0 < ratio < 1:
        raise ValueError(f"the pruning ratio must be in (0, 1), got {ratio}")
    before = (count_params(net), conv_channels(net))
    ignored = set(map(id, output_layers(net, inputs)))
    targets = [(m, "weight") for m in net.modules() if isinstance(m, _CONVS) and id(m) not in ignored]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=ratio)
    for m, name in targets:
        prune.remove(m, name)
    report = PruneReport(
        "magnitude", ratio, before[0], count_params(net), before[1], conv_channels(net), zero_fraction(net)
    )
    log.info("zeroed %.0f %% of the convolution weights (global L1)", report.zeros * 100)
    return report


def _param(like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty_like(like))


def conform(net: nn.Module, state: Mapping[str, Any]) -> bool:
    """Reshape ``net``'s convolutions, norms and linear layers to the widths of ``state`` (a
    state dict of the same architecture, possibly channel-pruned); returns whether anything
    changed. Load the weights afterwards with ``net.load_state_dict(state)``."""
    changed = False
    for name, m in net.named_modules():
        w = state.get(f"{name}.weight" if name else "weight")
        if not isinstance(w, torch.Tensor) or getattr(m, "weight", None) is None or m.weight.shape == w.shape:
            continue
        changed = True
        if isinstance(m, _CONVS):
            a, b = w.shape[:2]  # (out, in/groups), or (in, out/groups) for a transposed convolution
            m.in_channels, m.out_channels = (a, b * m.groups) if m.transposed else (b * m.groups, a)
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = w.shape
        elif isinstance(
            m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
        ):
            m.num_features = w.shape[0]
            for buf in ("running_mean", "running_var"):
                if getattr(m, buf, None) is not None:
                    setattr(m, buf, torch.empty_like(state[f"{name}.{buf}"]))
        elif isinstance(m, nn.GroupNorm):
            m.num_channels = w.shape[0]
            m.num_groups = math.gcd(m.num_groups, m.num_channels)
        else:
            raise ValueError(f"cannot reshape layer '{name}' ({type(m).__name__}) to {tuple(w.shape)}")
        m.weight = _param(w)
        if getattr(m, "bias", None) is not None and f"{name}.bias" in state:
            m.bias = _param(state[f"{name}.bias"])
    return changed


def load_weights(net: nn.Module, state: Mapping[str, Any]) -> None:
    """Load ``state`` into ``net``, reshaped to its widths first (:func:`conform`): a network
    built from its config takes a channel-pruned checkpoint's weights."""
    conform(net, state)
    net.load_state_dict(state)
