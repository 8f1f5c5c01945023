"""DDP replica checks: after an optimizer step every rank must hold bit-identical parameters
(DDP broadcasts the initial weights and all-reduces the gradients, so the same update runs
everywhere). ``train.check_replicas=N`` compares them every N optimizer steps."""

from __future__ import annotations

import torch
import torch.distributed as dist

from montage.platform.task import Modules


def replica_fingerprint(m: Modules) -> torch.Tensor:
    """Float64 (sum, sum of squares) of every parameter of every network, in a fixed order: any
    difference in one float32 element changes it."""
    parts = []
    with torch.no_grad():
        for name in sorted(m.nets):
            for p in m.unwrap(name).parameters():
                d = p.detach().double()
                parts += [d.sum(), (d * d).sum()]
    return torch.stack(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)


def diverged_ranks(m: Modules, world_size: int, device: torch.device) -> list[int]:
    """The ranks whose fingerprint differs from rank 0's (a collective: every rank calls it)."""
    fp = replica_fingerprint(m).to(device)
    gathered = [torch.empty_like(fp) for _ in range(world_size)]
    dist.all_gather(gathered, fp)
    return [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
