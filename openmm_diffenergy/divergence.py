"""Divergence estimators with one shared signature.

An estimator is called as ``estimator(fn, y, t)`` where ``fn(y, t)`` is a vector field
(B, dim) -> (B, dim) written with ``torch.func``-compatible operations (for example
:func:`~openmm_diffenergy.models.score_fn`), ``y`` has shape (B, dim) and ``t`` shape
(B,). It returns ``(fn(y, t), div)`` with ``div`` of shape (B,): the value comes for free
and solvers need it. The exact estimator is the oracle for the stochastic one.

:class:`FastDivergence` and :class:`FusedHutchinsonDivergence` read the model behind a
score function made by :func:`~openmm_diffenergy.models.score_fn` (its ``model``
attribute) and, for the package's own networks, propagate the Laplacian forward through
the network (:mod:`openmm_diffenergy.laplacian`) instead of differentiating twice.
"""
from __future__ import annotations

import torch

from . import laplacian, ops

__all__ = ["ExactDivergence", "HutchinsonDivergence", "FastDivergence",
           "FusedHutchinsonDivergence", "get_estimator"]


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


def _model_of(fn):
    """The model behind a score function from ``score_fn(model)``, or ``None``."""
    return getattr(fn, "model", None)


class FastDivergence:
    """Exact divergence of the score by forward-Laplacian propagation, in one pass.

    ``div s = -Laplacian(E)``: the energy network carries its value, its D-column
    Jacobian and its Laplacian through every layer (the per-layer rule runs in the
    compiled ``diffenergy`` operators, or in plain torch where they are absent). The
    score comes with it (``-J``). Agrees with :class:`ExactDivergence` to round-off at a
    fraction of its cost.

    ``fn`` must be ``score_fn(model)`` of a model with a forward-Laplacian rule
    (:class:`~openmm_diffenergy.MoleculeEnergy`, :class:`~openmm_diffenergy.DistanceMLPEnergy`);
    anything else raises ``ValueError``.
    """

    name = "fast"

    def reset(self):
        """Nothing to reset; present so that every estimator can be reused the same way."""

    def __call__(self, fn, y, t):
        model = _model_of(fn)
        if model is None or not laplacian.supports(model):
            what = "a function without a model" if model is None else type(model).__name__
            raise ValueError(
                f"divergence='fast' needs the score function of a model with a forward-"
                f"Laplacian rule (MoleculeEnergy, DistanceMLPEnergy), got {what}; use "
                "divergence='exact' or 'hutchinson'")
        _, grad, lap = laplacian.forward_laplacian(model, y, t)
        return -grad, -lap

    def describe(self) -> dict:
        return {"estimator": self.name,
                "backend": "diffenergy ops" if ops.using_ops() else "torch"}


class FusedHutchinsonDivergence(HutchinsonDivergence):
    """Hutchinson's estimator with the K probes propagated forward through the network.

    For models with a forward-Laplacian rule, ``sum_k v_k^T Hess(E) v_k`` comes from one
    forward pass carrying K probe columns instead of D unit vectors (the fused per-layer
    operators), and the score from one reverse pass. Any other model takes the
    ``vjp`` route of :class:`HutchinsonDivergence`. The probes, and so the estimate up to
    round-off, are those of :class:`HutchinsonDivergence` with the same arguments.

    Parameters
    ----------
    n_probes, distribution, seed
        As in :class:`HutchinsonDivergence`.
    """

    name = "fast-hutchinson"

    def __call__(self, fn, y, t):
        model = _model_of(fn)
        if model is None or not laplacian.supports(model):
            return super().__call__(fn, y, t)
        _, _, quad = laplacian.forward_laplacian(model, y, t, self.probes(y))
        return fn(y, t), -quad / self.n_probes


def get_estimator(divergence="exact", n_probes: int = 1, probe: str = "rademacher",
                  seed: int | None = None):
    """Resolve a ``divergence=`` argument to an estimator object.

    Parameters
    ----------
    divergence : {"exact", "hutchinson", "fast", "fast-hutchinson"} or estimator
        A name, or an object with the estimator signature (returned unchanged).
        ``"fast"`` is exact (:class:`FastDivergence`); ``"fast-hutchinson"`` is
        :class:`FusedHutchinsonDivergence`.
    n_probes, probe, seed
        Passed to the Hutchinson estimators.
    """
    if not isinstance(divergence, str):
        if not callable(divergence):
            raise ValueError(f"divergence must be a name or an estimator, got {divergence!r}")
        return divergence
    if divergence == "exact":
        return ExactDivergence()
    if divergence == "hutchinson":
        return HutchinsonDivergence(n_probes, probe, seed)
    if divergence == "fast":
        return FastDivergence()
    if divergence == "fast-hutchinson":
        return FusedHutchinsonDivergence(n_probes, probe, seed)
    raise ValueError(f"unknown divergence {divergence!r}; expected 'exact', 'hutchinson', "
                     "'fast' or 'fast-hutchinson'")
