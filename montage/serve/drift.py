"""Drift of live requests against a model version's reference (``drift_reference.json``):
a sliding window per feature, population stability index and scipy's two-sample KS test.
No Ray here: the deployments own a :class:`DriftDetector` and export what it finds."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from montage.platform.features import psi

log = logging.getLogger("montage.serve")


@dataclass
class FeatureDrift:
    psi: float
    ks: float  # the KS statistic (largest gap between the two CDFs, in [0, 1])
    p_value: float
    drifted: bool


class DriftDetector:
    """A window of the last ``window`` values of every reference feature; once ``min_samples``
    are in, every ``check_every`` new samples each feature is compared with the reference. A
    feature is drifted when its PSI reaches ``psi_threshold`` *and* the KS test rejects equality
    at ``ks_pvalue`` (either alone fires too often on small windows). A warning is logged once
    when a feature becomes drifted, and an info line when it comes back."""

    def __init__(
        self,
        reference: dict[str, Any],
        window: int = 200,
        min_samples: int = 30,
        psi_threshold: float = 0.25,
        ks_pvalue: float = 0.01,
        check_every: int = 10,
        label: str = "",
    ) -> None:
        self.reference = {
            k: np.asarray(v["values"], np.float64) for k, v in reference.get("features", {}).items() if v.get("values")
        }
        self.window, self.min_samples, self.check_every = window, min_samples, max(1, check_every)
        self.psi_threshold, self.ks_pvalue, self.label = psi_threshold, ks_pvalue, label
        self.values: dict[str, deque[float]] = {k: deque(maxlen=window) for k in self.reference}
        self.seen = 0
        self.state: dict[str, FeatureDrift] = {}
        self._bounds: dict[str, tuple[float, float] | None] = {}

    @property
    def features(self) -> list[str]:
        return list(self.reference)

    def add(self, row: dict[str, float]) -> bool:
        """Add one request's features; True when the drift state was re-evaluated."""
        for k, v in row.items():
            q = self.values.get(k)
            if q is not None:
                q.append(float(v))
        self.seen += 1
        if self.seen % self.check_every or self.samples() < self.min_samples:
            return False
        self.evaluate()
        return True

    def samples(self) -> int:
        return min((len(q) for q in self.values.values()), default=0)

    def evaluate(self) -> dict[str, FeatureDrift]:
        from scipy.stats import ks_2samp

        for k, ref in self.reference.items():
            live = np.asarray(self.values[k], np.float64)
            if len(live) < self.min_samples:
                continue
            score = psi(ref, live)
            if np.ptp(ref) == 0 and np.ptp(live) == 0 and ref[0] == live[0]:
                ks, p = 0.0, 1.0  # identical constants (e.g. every image the same width)
            else:
                res = ks_2samp(ref, live)
                ks, p = float(res.statistic), float(res.pvalue)
            drifted = score >= self.psi_threshold and p <= self.ks_pvalue
            before = self.state.get(k)
            if drifted and not (before and before.drifted):
                log.warning(
                    "input drift%s: feature '%s' PSI %.3f ≥ %.3f, KS %.3f (p=%.2g) over the last %d requests",
                    f" ({self.label})" if self.label else "",
                    k,
                    score,
                    self.psi_threshold,
                    ks,
                    p,
                    len(live),
                )
            elif before and before.drifted and not drifted:
                log.info(
                    "feature '%s'%s back in distribution (PSI %.3f)", k, f" ({self.label})" if self.label else "", score
                )
            self.state[k] = FeatureDrift(psi=score, ks=ks, p_value=p, drifted=drifted)
        return self.state

    def out_of_range(self, name: str, value: float, margin: float = 0.1) -> bool:
        """Whether ``value`` lies outside the reference's central 99 % (widened by ``margin`` of
        its span): an output-quality anomaly."""
        if name not in self._bounds:
            ref = self.reference.get(name)
            if ref is None or len(ref) < 10:
                self._bounds[name] = None
            else:
                lo, hi = np.quantile(ref, [0.005, 0.995])
                pad = margin * (hi - lo)
                self._bounds[name] = (float(lo - pad), float(hi + pad))
        b = self._bounds[name]
        return b is not None and not b[0] <= value <= b[1]

    def summary(self) -> dict[str, Any]:
        return {
            "samples": self.samples(),
            "window": self.window,
            "min_samples": self.min_samples,
            "psi_threshold": self.psi_threshold,
            "ks_pvalue": self.ks_pvalue,
            "features": {
                k: {
                    "psi": round(s.psi, 4),
                    "ks": round(s.ks, 4),
                    "p_value": float(f"{s.p_value:.3g}"),
                    "drifted": s.drifted,
                }
                for k, s in self.state.items()
            },
            "drifted": sorted(k for k, s in self.state.items() if s.drifted),
        }
