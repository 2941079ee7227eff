"""Refinement on the T1w's own grid: CA-Diff's probabilities as a spatial prior, the image's
intensities as the likelihood, combined by expectation-maximisation.

The network reasons on a coarse grid (2 mm for the bundled model). Its class probabilities,
trilinearly resampled onto the T1w's own (typically 1 mm) grid, say *where* each structure may
be; they cannot place a boundary more finely than their grid. The T1w says *what tissue* each
fine voxel holds. This module fits one Gaussian intensity model per structure (and a small
mixture for the background, which holds skull, scalp and CSF of very different brightness)
to the image, weighted by the current posterior, and recomputes the posterior

    p(c | x, v) ∝ prior(c, v) ** prior_weight · N(x_v; μ_c, σ_c)

for a few iterations, as atlas-based EM segmenters (SPM, FreeSurfer's SAMSEG) do with a
probabilistic atlas. Structures of the same tissue keep the prior's split between them (their
Gaussians are alike); what moves are the boundaries between tissues (grey/white matter,
cortex/CSF, ventricles), at the image's resolution.

Pure numpy: arrays in, arrays out; no I/O. Voxels whose background prior is at least
``RefineSettings.active_threshold`` are not touched (they stay background), which keeps the
work to the brain and its border.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

__all__ = ["RefineSettings", "refine_posterior", "refine_posterior_chunks"]


@dataclass(frozen=True)
class RefineSettings:
    """Settings of :func:`refine_posterior` (fixed before any evaluation, not tuned on data).

    Attributes:
        iterations: EM iterations (each: fit Gaussians, recompute the posterior).
        prior_weight: exponent on the prior; 1 is Bayes' rule.
        background_components: Gaussians of the background mixture.
        min_std_fraction: floor of each class's standard deviation, as a fraction of the
            1st-99th percentile intensity range of the active voxels (keeps a small structure
            from collapsing onto a narrow intensity band).
        active_threshold: voxels with a background prior at least this are left background.
        prior_floor: prior probabilities are clipped below at this before the logarithm.
    """

    iterations: int = 5
    prior_weight: float = 1.0
    background_components: int = 3
    min_std_fraction: float = 0.03
    active_threshold: float = 0.995
    prior_floor: float = 1e-6

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.prior_weight > 0:
            raise ValueError(f"prior_weight must be > 0, got {self.prior_weight}")
        if self.background_components < 1:
            raise ValueError(
                f"background_components must be >= 1, got {self.background_components}"
            )
        if not 0 < self.min_std_fraction < 1:
            raise ValueError(f"min_std_fraction must be in (0, 1), got {self.min_std_fraction}")
        if not 0 < self.active_threshold <= 1:
            raise ValueError(f"active_threshold must be in (0, 1], got {self.active_threshold}")

    def as_dict(self) -> dict[str, float | int]:
        """The settings, for a sidecar or a checkpoint."""
        return asdict(self)


def _log_gauss(x: np.ndarray, mean: float, var: float) -> np.ndarray:
    """``(N,)`` float32 log density of ``N(mean, var)`` at ``x``."""
    return (-0.5 * np.log(2 * np.pi * var) - 0.5 * (x - mean) ** 2 / var).astype(np.float32)


def _weighted_stats(x: np.ndarray, w: np.ndarray, floor_var: float) -> tuple[float, float, float]:
    """``(sum of weights, weighted mean, weighted variance ≥ floor_var)``."""
    total = float(w.sum(dtype=np.float64))
    if total <= 0:
        return 0.0, float(x.mean()), floor_var
    mean = float(np.dot(w, x) / total)
    var = float(np.dot(w, (x - mean) ** 2) / total)
    return total, mean, max(var, floor_var)


def _fit_background(
    x: np.ndarray, w: np.ndarray, k: int, floor_var: float, iterations: int = 3
) -> list[tuple[float, float, float]]:
    """``k`` Gaussians ``(weight, mean, variance)`` fitted to ``x`` weighted by ``w``."""
    total = float(w.sum(dtype=np.float64))
    if total <= 0:
        return [(1.0, float(x.mean()), max(float(x.var()), floor_var))]
    order = np.argsort(x)
    cum = np.cumsum(w[order], dtype=np.float64) / total
    groups = np.split(order, np.searchsorted(cum, np.linspace(0, 1, k + 1)[1:-1]))
    params = []
    for g in groups:
        n, mean, var = _weighted_stats(x[g], w[g], floor_var) if len(g) else (0.0, 0.0, floor_var)
        params.append((max(n, 1e-6) / total, mean, var))
    for _ in range(iterations):
        resp = _responsibilities(x, params)
        params = []
        for r in resp:
            n, mean, var = _weighted_stats(x, r * w, floor_var)
            params.append((max(n, 1e-6) / total, mean, var))
    return params


def _mixture_terms(x: np.ndarray, params: list[tuple[float, float, float]]) -> np.ndarray:
    """``(K, N)`` log weight plus log density of each mixture component at ``x``."""
    return np.stack([np.log(p) + _log_gauss(x, m, v) for p, m, v in params])


def _responsibilities(x: np.ndarray, params: list[tuple[float, float, float]]) -> np.ndarray:
    """``(K, N)`` posterior of each mixture component at ``x`` (columns sum to 1)."""
    logs = _mixture_terms(x, params)
    resp = np.exp(logs - logs.max(axis=0))
    return resp / resp.sum(axis=0, keepdims=True)


def _mixture_loglik(x: np.ndarray, params: list[tuple[float, float, float]]) -> np.ndarray:
    """``(N,)`` float32 log-likelihood of the mixture at ``x`` (log-sum-exp)."""
    logs = _mixture_terms(x, params)
    top = logs.max(axis=0)
    return (top + np.log(np.exp(logs - top).sum(axis=0))).astype(np.float32)


@dataclass(frozen=True)
class _Model:
    """Fitted intensity model: the background mixture and one ``(mean, var)`` per class
    (``None``: the class had no mass and keeps the background's likelihood)."""

    background: list[tuple[float, float, float]]
    classes: list[tuple[float, float] | None]


def _loglik(x: np.ndarray, model: _Model) -> np.ndarray:
    """``(C, N)`` float32 log-likelihoods."""
    out = np.empty((1 + len(model.classes), x.size), dtype=np.float32)
    out[0] = _mixture_loglik(x, model.background)
    for c, params in enumerate(model.classes, start=1):
        out[c] = out[0] if params is None else _log_gauss(x, *params)
    return out


def _posterior(log_prior: np.ndarray, loglik: np.ndarray) -> np.ndarray:
    """``(C, N)`` normalised ``exp(log_prior + loglik)`` over classes (in place of a temporary)."""
    logits = log_prior + loglik
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits


def _fit(x: np.ndarray, post: np.ndarray, settings: RefineSettings, floor_var: float) -> _Model:
    """M-step: the intensity model of the ``(C, N)`` posterior ``post`` at intensities ``x``."""
    background = _fit_background(x, post[0], settings.background_components, floor_var)
    classes: list[tuple[float, float] | None] = []
    for c in range(1, post.shape[0]):
        n, mean, var = _weighted_stats(x, post[c], floor_var)
        classes.append((mean, var) if n >= 1.0 else None)
    return _Model(background, classes)


def _as_float32(values: np.ndarray) -> np.ndarray:
    """float32 copy of a float16/32 array (through torch: numpy's float16 conversion is slow)."""
    import torch

    if values.dtype == np.float32:
        return values.copy()
    return torch.from_numpy(np.ascontiguousarray(values)).float().numpy()


def _check(prior: np.ndarray, intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``prior`` as float16/32 ``(C, N)`` and ``intensity`` as float32 ``(N,)``, checked."""
    prior = np.asarray(prior)
    if prior.dtype not in (np.float16, np.float32):
        prior = prior.astype(np.float32)
    x = np.asarray(intensity, dtype=np.float32)
    if prior.ndim != 2 or prior.shape[0] < 2:
        raise ValueError(f"prior must be (C >= 2, N), got shape {prior.shape}")
    if x.shape != (prior.shape[1],):
        raise ValueError(f"intensity must be ({prior.shape[1]},), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("intensity has NaN or infinite values; the T1w must be finite")
    return prior, x


def _posterior_chunks(
    prior: np.ndarray, x_all: np.ndarray, settings: RefineSettings, max_fit_voxels: int,
    chunk: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fit the intensity model, then yield ``(columns, (C, n) float32 posterior)`` for the
    active columns, ``chunk`` at a time."""
    active = np.flatnonzero(prior[0] < settings.active_threshold)
    if settings.iterations == 0 or active.size < 2:
        return
    fit = active[:: max(1, -(-active.size // max_fit_voxels))]
    x = x_all[fit]
    lo, hi = np.percentile(x, [1, 99])
    floor_var = float((settings.min_std_fraction * max(float(hi - lo), 1e-6)) ** 2)

    def log_prior(p: np.ndarray) -> np.ndarray:
        clipped = np.clip(p, settings.prior_floor, None)
        return settings.prior_weight * np.log(clipped)

    post = _as_float32(prior[:, fit])
    fit_log_prior = log_prior(post)
    model = _fit(x, post, settings, floor_var)
    for _ in range(settings.iterations - 1):
        post = _posterior(fit_log_prior, _loglik(x, model))
        model = _fit(x, post, settings, floor_var)
    del post, fit_log_prior
    for start in range(0, active.size, chunk):
        cols = active[start : start + chunk]
        p = _as_float32(prior[:, cols])
        mass = p.sum(axis=0, keepdims=True)
        yield cols, _posterior(log_prior(p), _loglik(x_all[cols], model)) * mass


def refine_posterior_chunks(
    prior: np.ndarray,
    intensity: np.ndarray,
    settings: RefineSettings = RefineSettings(),
    *,
    max_fit_voxels: int = 400_000,
    chunk: int = 262_144,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`refine_posterior` ``chunk`` columns at a time, without holding all of it.

    Yields:
        ``(columns, posterior)``: column indices ``(n,)`` and their ``(C, n)`` float32
        posterior. Every column is yielded exactly once: active ones refined, the others (a
        background prior of at least ``settings.active_threshold``) as their prior.
    """
    prior, x = _check(prior, intensity)
    refined = np.zeros(prior.shape[1], dtype=bool)
    for cols, post in _posterior_chunks(prior, x, settings, max_fit_voxels, chunk):
        refined[cols] = True
        yield cols, post
    rest = np.flatnonzero(~refined)
    for start in range(0, rest.size, chunk):
        cols = rest[start : start + chunk]
        yield cols, _as_float32(prior[:, cols])


def refine_posterior(
    prior: np.ndarray,
    intensity: np.ndarray,
    settings: RefineSettings = RefineSettings(),
    *,
    max_fit_voxels: int = 400_000,
    chunk: int = 262_144,
) -> np.ndarray:
    """Posterior class probabilities from a spatial prior and the voxels' intensities.

    The intensity model is fitted on at most ``max_fit_voxels`` of the active voxels (an
    even stride through them: deterministic); the posterior is then computed for all of them,
    ``chunk`` voxels at a time.

    Args:
        prior: ``(C, N)`` float16/32 probabilities of ``C`` classes (channel 0: background)
            at ``N`` voxels, each column summing to about 1 (columns summing to less, e.g. at
            the edge of the model's grid, keep their total).
        intensity: ``(N,)`` bias-corrected intensities of the same voxels (any scale).
        settings: see :class:`RefineSettings`.

    Returns:
        ``(C, N)`` float32 posterior probabilities; columns whose background prior is at least
        ``settings.active_threshold`` are returned unchanged.

    Raises:
        ValueError: shapes that do not match, or fewer than two classes.
    """
    out = np.empty(np.shape(prior), dtype=np.float32)
    for cols, post in refine_posterior_chunks(
        prior, intensity, settings, max_fit_voxels=max_fit_voxels, chunk=chunk
    ):
        out[:, cols] = post
    return out
