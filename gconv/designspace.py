"""Design spaces (Radosavovic et al. 2019, 2020): distributions over RegNet/AnyNet settings, sampled into ordinary
model configs inside a complexity regime, and compared by the empirical distribution functions (EDFs) of their
models' errors.

A `DesignSpace` draws RegNet parameters: depth uniform on integers; w0, wa and wm log-uniform; the group width from
a list of choices (0: the full bottleneck width, i.e. no groups) and the bottleneck multiplier from another. Each
sample becomes AnyNet's fields (`gconv.models.anynet.regnet_fields`, with pycls's compatibility adjustment), so
`launch.py` trains it like any sweep point. `sample(space, n, regime, seed)` keeps the samples whose complexity
(closed form, `anynet.complexity`) falls inside the `Regime`, by rejection, and reports the acceptance rate.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from gconv.models import anynet

__all__ = ["DesignSpace", "Regime", "Sample", "sample", "draw", "edf", "bootstrap_difference"]


@dataclasses.dataclass(frozen=True)
class DesignSpace:
    """A distribution over RegNet settings. Ranges are (low, high), inclusive; `group_widths` and `bottlenecks`
    are the choices, drawn uniformly (a group width of 0 is the full bottleneck width: one group)."""
    name: str
    depth: tuple[int, int] = (6, 20)
    w0: tuple[float, float] = (8.0, 64.0)
    wa: tuple[float, float] = (8.0, 64.0)
    wm: tuple[float, float] = (1.5, 3.0)
    group_widths: Sequence[int] = (1, 2, 4, 8, 16, 32)
    bottlenecks: Sequence[float] = (1.0,)
    stem: str = "cifar"
    stem_width: int = 16
    max_stages: int = 4  # samples with more stages are rejected (pycls: 4)

    def __post_init__(self):
        for key in ("depth", "w0", "wa", "wm"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                raise ValueError(f"design space {self.name!r}: {key}={(low, high)} must be 0 < low <= high.")
        if self.wm[0] <= 1:
            raise ValueError(f"design space {self.name!r}: wm={self.wm} must be > 1 (widths grow by wm per stage).")
        if not self.group_widths or any(g < 0 for g in self.group_widths):
            raise ValueError(f"design space {self.name!r}: group_widths={self.group_widths} must be >= 0 (0: no "
                             f"groups).")


@dataclasses.dataclass(frozen=True)
class Regime:
    """A complexity window: each of `macs`, `params`, `acts` is (low, high) inclusive, or None for no bound
    (pycls's convention: `macs` counts the classifier's biases too)."""
    macs: tuple[float, float] | None = None
    params: tuple[float, float] | None = None
    acts: tuple[float, float] | None = None

    def holds(self, cx: dict[str, int]) -> bool:
        return all(window is None or window[0] <= cx[key] <= window[1]
                   for key, window in (("macs", self.macs), ("params", self.params), ("acts", self.acts)))


@dataclasses.dataclass(frozen=True)
class Sample:
    space: str
    regnet: dict  # the drawn parameters: w0, wa, wm, depth, group_width, bottleneck
    fields: dict  # AnyNet's fields (the model config's)
    complexity: dict  # params, macs, acts


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw(space: DesignSpace, rng: np.random.Generator) -> tuple[dict, dict]:
    """One draw: (RegNet parameters, AnyNet fields), with no complexity constraint."""
    regnet = dict(depth=int(rng.integers(space.depth[0], space.depth[1] + 1)),
                  w0=round(_log_uniform(rng, *space.w0), 2), wa=round(_log_uniform(rng, *space.wa), 2),
                  wm=round(_log_uniform(rng, *space.wm), 3),
                  group_width=int(space.group_widths[rng.integers(len(space.group_widths))]),
                  bottleneck=float(space.bottlenecks[rng.integers(len(space.bottlenecks))]))
    group_width = regnet["group_width"] or 1 << 30  # 0: as wide as the bottleneck, one group
    fields = anynet.regnet_fields(regnet["w0"], regnet["wa"], regnet["wm"], regnet["depth"], group_width,
                                  regnet["bottleneck"])
    fields.update(stem=space.stem, stem_width=space.stem_width)  # every stage stride 2, as pycls's RegNet
    return regnet, fields


def sample(space: DesignSpace, n: int, regime: Regime = Regime(), seed: int = 0,
           input_shape: Sequence[int] = (32, 32, 3), num_classes: int = 10,
           max_draws: int = 100_000) -> tuple[list[Sample], float]:
    """`n` models of `space` inside `regime` (rejection sampling from `seed`) and the acceptance rate (accepted /
    drawn). Raises `ValueError` when `max_draws` draws do not give `n`: widen the regime or the space."""
    rng = np.random.default_rng(seed)
    accepted: list[Sample] = []
    draws = 0
    while len(accepted) < n:
        if draws >= max_draws:
            raise ValueError(f"design space {space.name!r}: {len(accepted)} of {n} models inside {regime} after "
                             f"{draws} draws: widen the regime or the space's ranges.")
        draws += 1
        regnet, fields = draw(space, rng)
        if len(fields["widths"]) > space.max_stages:
            continue
        cx = anynet.complexity(fields, input_shape, num_classes)
        if regime.holds(cx):
            accepted.append(Sample(space.name, regnet, fields, cx))
    return accepted, len(accepted) / draws


# --- comparing design spaces ---------------------------------------------------------------------------------

def edf(errors: Sequence[float], at: Sequence[float]) -> np.ndarray:
    """The empirical distribution function of `errors` at each point of `at`: the fraction of errors <= it."""
    values = np.sort(np.asarray(errors, float))
    return np.searchsorted(values, np.asarray(at, float), side="right") / len(values)


def bootstrap_difference(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean(b) - mean(a), low, high): the difference of mean errors and its percentile bootstrap confidence
    interval at `level`, each space resampled with replacement `resamples` times."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a bootstrap needs at least 2 models per design space (got {len(a)} and {len(b)}).")
    rng = np.random.default_rng(seed)
    means_a = a[rng.integers(len(a), size=(resamples, len(a)))].mean(axis=1)
    means_b = b[rng.integers(len(b), size=(resamples, len(b)))].mean(axis=1)
    low, high = np.quantile(means_b - means_a, [(1 - level) / 2, (1 + level) / 2])
    return float(b.mean() - a.mean()), float(low), float(high)
