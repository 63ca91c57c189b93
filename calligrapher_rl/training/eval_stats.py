"""Statistics of an evaluation: means with 95% intervals, paired differences, and the verdict.

A sample is one (example, initial noise) pair; every checkpoint is evaluated on the same samples (the same
examples and the same noises), so two checkpoints are compared sample by sample.

Interval: percentile bootstrap, stratified by example. The examples are the fixed evaluation set; what is
random is the initial noise. Each resample draws, within every example, its K samples with replacement, so
the interval says how sure the mean is over *these* examples with fresh noise (not over other examples).
With one noise per example (K = 1) nothing varies within an example, and the bootstrap draws examples
instead. Paired comparison: the same bootstrap of the per-sample differences b - a. Samples with a failed
(NaN) value are left out (a pair if either side failed), never scored 0.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 2000
BOOT_SEED = 0
# metrics where smaller is better (the verdict turns around for them)
LOWER_IS_BETTER = ("ocr_edit_distance", "preservation_mae")


def _resample_means(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if counts.max() <= 1:  # one sample per example: draw examples
        idx = rng.integers(0, len(values), (n_boot, len(values)))
        return values[idx].mean(axis=1)
    total = np.zeros(n_boot)
    for g in range(len(uniq)):
        own = values[inverse == g]
        idx = rng.integers(0, len(own), (n_boot, len(own)))
        total += own[idx].sum(axis=1)
    return total / len(values)


def mean_ci(values, groups=None, *, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """{"mean", "ci95": [lo, hi], "n"} of the finite values (NaN mean and interval when none is finite)."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    ok = np.isfinite(values)
    values, groups = values[ok], groups[ok]
    if not len(values):
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    means = _resample_means(values, groups, n_boot, seed)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "ci95": [float(lo), float(hi)], "n": int(len(values))}


def paired(a, b, groups=None, **kw) -> dict:
    """mean(b - a) over the samples where both are finite, with its interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return mean_ci(b - a, groups, **kw)


def verdict(metric: str, a: str, b: str, ci95: list[float]) -> str:
    """Which checkpoint is better on `metric`, and whether the 95% interval of b - a says so."""
    lo, hi = ci95
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no finite values"
    if lo <= 0 <= hi:
        return "no clear difference (the 95% interval includes 0)"
    b_higher = lo > 0
    better = b if b_higher != (metric in LOWER_IS_BETTER) else a
    return f"{better} is better (the 95% interval excludes 0)"


def normalized_edit_distance(read: str, target: str) -> float:
    """Levenshtein distance between the normalised reading and target (the OCR reward's normalisation:
    lower case, no whitespace), divided by the longer of the two: 0 = identical, 1 = nothing in common."""
    from rapidfuzz.distance import Levenshtein

    from ..rewards.ocr import normalize

    r, t = normalize(read), normalize(target)
    longest = max(len(r), len(t))
    return Levenshtein.distance(r, t) / longest if longest else 0.0


def halfwidth_for(sd: float, n: int) -> float:
    """The normal approximation of a 95% interval's half-width: how large n must be for a wanted precision."""
    return 1.96 * sd / np.sqrt(max(n, 1))
