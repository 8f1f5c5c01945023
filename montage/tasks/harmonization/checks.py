"""Harmonization data checks (``montage data check harmonization``): every pair a source makes."""

from __future__ import annotations

import numpy as np

from montage.platform.datacheck import Probe
from montage.tasks.harmonization.data import HarmDataConfig, pair_source
from montage.tasks.harmonization.sources import CutoutsOnBackgrounds, PairSource


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


class CutoutsCheck:
    """The cut-out and background folders as a check source: every file read at least once, sample
    ``i`` is cut-out ``i`` on background ``i`` (each list repeated up to the longer one), the pair
    the dataset would paste from them. (The dataset itself draws ``synthetic_train`` /
    ``synthetic_val`` pairs with random backgrounds: a cut-out appears in many of them.)"""

    def __init__(self, source: CutoutsOnBackgrounds, seed: int) -> None:
        self.source, self.seed = source, seed
        self.n_cut, self.n_bg = len(source.cutouts), len(source.backgrounds)

    def __len__(self) -> int:
        return max(self.n_cut, self.n_bg)

    def name(self, i: int) -> str:
        return f"{self.source.cutouts[i % self.n_cut]} on {self.source.backgrounds[i % self.n_bg]}"

    def probe(self, i: int) -> Probe:
        comp, mask, real = self.source.paste(i % self.n_cut, i % self.n_bg, np.random.default_rng([self.seed, i]))
        return Probe(comp, mask, target=real)


def check_sources(cfg: HarmDataConfig) -> dict[str, PairCheck | CutoutsCheck]:
    """``montage data check``: train and val; ``all`` for a mask source (its val is held out) and
    for cut-outs (train and val paste from the same folders)."""
    if cfg.source == "cutouts":
        return {"all": CutoutsCheck(CutoutsOnBackgrounds(cfg.root, cfg.backgrounds, 1, cfg.perturb), cfg.seed)}
    if cfg.source in ("synthetic", "iharmony4"):
        return {
            "train": PairCheck(pair_source(cfg, "train"), cfg.seed),
            "val": PairCheck(pair_source(cfg, "val"), cfg.seed + 1),
        }
    return {"all": PairCheck(pair_source(cfg, "train"), cfg.seed)}
