"""Harmonization data checks (``montage data check harmonization``): every pair a source makes."""

from __future__ import annotations

import numpy as np

from montage.platform.datacheck import Probe
from montage.tasks.harmonization.data import HarmDataConfig, PairSource, pair_source


class PairCheck:
    """A pair source as a :class:`~montage.platform.datacheck.CheckSource`: the composite with its
    mask overlaid, the real image beside it (the pair the dataset would make for index ``i``)."""

    def __init__(self, source: PairSource, seed: int) -> None:
        self.source, self.seed = source, seed

    def __len__(self) -> int:
        return len(self.source)

    def name(self, i: int) -> str:
        return self.source.name(i)

    def probe(self, i: int) -> Probe:
        comp, mask, real = self.source.load(i, np.random.default_rng([self.seed, i]))
        return Probe(comp, mask, target=real)


def check_sources(cfg: HarmDataConfig) -> dict[str, PairCheck]:
    """``montage data check``: train and val (``all`` for a mask source, whose val is held out)."""
    if cfg.source in ("synthetic", "iharmony4", "cutouts"):
        return {
            "train": PairCheck(pair_source(cfg, "train"), cfg.seed),
            "val": PairCheck(pair_source(cfg, "val"), cfg.seed + 1),
        }
    return {"all": PairCheck(pair_source(cfg, "train"), cfg.seed)}
