"""Divergence estimators with one shared signature.

An estimator is called as ``estimator(fn, y, t)`` where ``fn(y, t)`` is a vector field
(B, dim) -> (B, dim) written with ``torch.func``-compatible operations (for example
:func:`~openmm_diffenergy.models.score_fn`), ``y`` has shape (B, dim) and ``t`` shape
(B,). It returns ``(fn(y, t), div)`` with ``div`` of shape (B,): the value comes for free
and solvers need it. The exact estimator is the oracle for the stochastic one.
"""
from __future__ import annotations

import torch

__all__ = ["ExactDivergence", "HutchinsonDivergence", "get_estimator"]


def _vjp_quadratic(fn, y, t, v):
    """``fn(y, t)`` and ``v_k^T J v_k`` per sample, for probes ``v`` of shape (K, B, dim).

    One reverse pass, vectorized over the K probes with ``torch.func.vmap``. Samples
    must not interact inside ``fn`` (true of every energy model here), so a probe that
    is the same basis vector in every sample reads one Jacobian row of all samples.
    """
    value, vjp = torch.func.vjp(lambda yy: fn(yy, t), y)
    vj = torch.func.vmap(vjp)(v)[0]          # (K, B, dim): v^T J
    return value, (vj * v).sum(-1)


class ExactDivergence:
    """Exact divergence: the trace of the Jacobian, one row per dimension, vectorized.

    The ``dim`` unit vectors are pushed through one reverse pass with
    ``torch.func.vmap`` (no Python loop over dimensions); the trace is the sum of the
    diagonal entries they read. Its cost grows with ``dim``; its error is round-off only.

    Parameters
    ----------
    chunk : int, optional
        Unit vectors per vectorized pass (bounds memory at large ``dim``); all at once
        by default.
    """

    name = "exact"

    def __init__(self, chunk: int | None = None):
        self.chunk = chunk

    def reset(self):
        """Nothing to reset; present so that every estimator can be reused the same way."""

    def __call__(self, fn, y, t):
        dim = y.shape[1]
        eye = torch.eye(dim, dtype=y.dtype, device=y.device)
        chunk = dim if self.chunk is None else int(self.chunk)
        value, div = None, torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        for lo in range(0, dim, chunk):
            v = eye[lo:lo + chunk, None, :].expand(-1, y.shape[0], dim)
            value, quad = _vjp_quadratic(fn, y, t, v)
            div = div + quad.sum(0)
        return value, div

    def describe(self) -> dict:
        return {"estimator": self.name}


class HutchinsonDivergence:
    """Hutchinson's stochastic trace estimator ``div ~ (1/K) sum_k v_k^T J v_k``.

    Parameters
    ----------
    n_probes : int
        Number of probe vectors ``K`` per sample.
    distribution : {"rademacher", "gaussian"}
        Probe distribution; both have identity covariance, so the estimate is unbiased.
    seed : int, optional
        Seed of the probe generator.

    Notes
    -----
    Probes are drawn on the first call and held fixed until :meth:`reset` (or a call
    with another shape), so one ODE solve sees one set of probes, as the estimator's
    unbiasedness along a solve requires. ``exp`` of a log-likelihood built on it is
    biased: importance weights need the exact estimator.
    """

    name = "hutchinson"

    def __init__(self, n_probes: int = 1, distribution: str = "rademacher", seed: int | None = None):
        if int(n_probes) < 1:
            raise ValueError(f"n_probes must be a positive integer, got {n_probes}")
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
        self.n_probes = int(n_probes)
        self.distribution = distribution
        self.seed = seed
        self._generator = torch.Generator()
        if seed is not None:
            self._generator.manual_seed(int(seed))
        else:
            self._generator.seed()
        self._probes = None

    def reset(self):
        """Forget the current probes; the next call draws new ones."""
        self._probes = None

    def probes(self, y: torch.Tensor) -> torch.Tensor:
        """The probes for a batch like ``y``: shape (K, B, dim)."""
        shape = (self.n_probes,) + tuple(y.shape)
        if self._probes is None or tuple(self._probes.shape) != shape:
            if self.distribution == "rademacher":
                v = torch.randint(0, 2, shape, generator=self._generator).to(y.dtype) * 2 - 1
            else:
                v = torch.randn(shape, generator=self._generator, dtype=y.dtype)
            self._probes = v.to(y.device)
        return self._probes.to(y.dtype)

    def __call__(self, fn, y, t):
        value, quad = _vjp_quadratic(fn, y, t, self.probes(y))
        return value, quad.mean(0)

    def describe(self) -> dict:
        return {"estimator": self.name, "n_probes": self.n_probes,
                "distribution": self.distribution, "seed": self.seed}


def get_estimator(divergence="exact", n_probes: int = 1, probe: str = "rademacher",
                  seed: int | None = None):
    """Resolve a ``divergence=`` argument to an estimator object.

    Parameters
    ----------
    divergence : {"exact", "hutchinson"} or estimator
        A name, or an object with the estimator signature (returned unchanged).
    n_probes, probe, seed
        Passed to :class:`HutchinsonDivergence`.
    """
    if not isinstance(divergence, str):
        if not callable(divergence):
            raise ValueError(f"divergence must be a name or an estimator, got {divergence!r}")
        return divergence
    if divergence == "exact":
        return ExactDivergence()
    if divergence == "hutchinson":
        return HutchinsonDivergence(n_probes, probe, seed)
    raise ValueError(f"unknown divergence {divergence!r}; expected 'exact' or 'hutchinson'")
