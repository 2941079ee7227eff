"""The final class probabilities on the T1w's own grid, summarised as they are computed.

The full posterior of a 256³ T1w over 33 classes would take 2.2 GB as float32, so it is never
held: the voxels arrive in blocks (:func:`bids_cadiff.inference.resample.posterior_on_grid`)
and :class:`GridPosterior` keeps what the outputs need:

* the label (argmax) and its probability, the *confidence*, per voxel;
* the sum of every class's probability over the image (the structures' soft volumes);
* optionally the probabilities themselves, quantised to 1/255 (``--save-probabilities``).

Voxels that no block covers are background with probability 1: those outside the model's
grid, and those whose trilinear neighbourhood on it gives no structure more than
:data:`~bids_cadiff.inference.resample.BACKGROUND_EPS` (about 40 % of a head's voxels, whose
resampling is skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GridPosterior", "PROBABILITY_SCALE", "temper"]

#: Stored probabilities are ``round(p * PROBABILITY_SCALE)`` in uint8.
PROBABILITY_SCALE = 255


def temper(posterior: np.ndarray, temperature: float) -> np.ndarray:
    """``(C, n)`` probabilities raised to ``1 / temperature`` and renormalised per column
    (``temperature`` > 1 softens overconfident probabilities; the argmax is unchanged).

    Example:
        >>> temper(np.array([[0.9], [0.1]]), 2.0).round(3).ravel().tolist()
        [0.75, 0.25]
    """
    if temperature == 1.0:
        return posterior
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = np.asarray(posterior, dtype=np.float32)
    with np.errstate(divide="ignore"):
        logp = np.log(p) / np.float32(temperature)
    logp -= logp.max(axis=0, keepdims=True)
    q = np.exp(logp)
    return q / q.sum(axis=0, keepdims=True)


@dataclass
class GridPosterior:
    """Summary of a ``(C, X, Y, Z)`` posterior, filled block by block with :meth:`add`.

    Attributes:
        labels: ``(X, Y, Z)`` int16 channel index of the most probable class.
        confidence: ``(X, Y, Z)`` float32 probability of that class.
        soft_counts: ``(C,)`` float64 sum of each class's probability over all voxels.
        probabilities: ``(X, Y, Z, C)`` uint8 probabilities × :data:`PROBABILITY_SCALE`, or
            ``None`` when not kept.
    """

    labels: np.ndarray
    confidence: np.ndarray
    soft_counts: np.ndarray
    probabilities: np.ndarray | None = None

    @classmethod
    def empty(
        cls, shape: tuple[int, int, int], num_classes: int, *, keep_probabilities: bool = False
    ) -> GridPosterior:
        """All voxels background with probability 1 (what :meth:`add` then overwrites)."""
        n = int(np.prod(shape))
        soft = np.zeros(num_classes, dtype=np.float64)
        soft[0] = n
        probabilities = None
        if keep_probabilities:
            probabilities = np.zeros((*shape, num_classes), dtype=np.uint8)
            probabilities[..., 0] = PROBABILITY_SCALE
        return cls(
            labels=np.zeros(shape, dtype=np.int16),
            confidence=np.ones(shape, dtype=np.float32),
            soft_counts=soft,
            probabilities=probabilities,
        )

    @property
    def num_classes(self) -> int:
        return int(self.soft_counts.shape[0])

    def add(self, flat_index: np.ndarray, posterior: np.ndarray) -> None:
        """Set the voxels ``flat_index`` (``(n,)``, C order, each once over all calls) to the
        ``(C, n)`` ``posterior``. Columns that do not sum to 1 (the edge of the model's grid)
        are renormalised, which keeps their argmax."""
        if posterior.shape != (self.num_classes, flat_index.size):
            raise ValueError(
                f"posterior must be ({self.num_classes}, {flat_index.size}), got {posterior.shape}"
            )
        post = np.asarray(posterior, dtype=np.float32)
        total = post.sum(axis=0)
        if np.abs(total - 1.0).max(initial=0.0) > 1e-4:
            post = post / np.maximum(total, 1e-6)
        self.soft_counts[0] -= flat_index.size  # these voxels were counted as background
        self.soft_counts += post.sum(axis=1, dtype=np.float64)
        self.labels.reshape(-1)[flat_index] = post.argmax(axis=0)
        self.confidence.reshape(-1)[flat_index] = post.max(axis=0)
        if self.probabilities is not None:
            flat = self.probabilities.reshape(-1, self.num_classes)
            flat[flat_index] = np.rint(post.T * PROBABILITY_SCALE).astype(np.uint8)

    def uncertainty(self) -> np.ndarray:
        """``(X, Y, Z)`` float32 ``1 - confidence``: the posterior probability that the
        voxel's label is wrong."""
        return (1.0 - self.confidence).astype(np.float32)
