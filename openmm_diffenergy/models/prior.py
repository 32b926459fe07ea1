"""A time-dependent harmonic prior in internal coordinates, fitted to data.

Bond lengths, 1-3 distances and the signed volumes around branching atoms are the stiff,
nearly Gaussian coordinates of a molecule. Their diffused statistics are cheap to measure:
noise the data to time ``t`` exactly (``y_t = alpha y_0 + sigma eps``) and record the mean
``m_f(t)`` and variance ``v_f(t)`` of each feature ``f``. The prior energy

    E_prior(y, t) = alpha(t)^2 * sum_f g_f (phi_f(y) - m_f(t))^2 / (2 v_f(t))

then holds bonds, angles and chirality at small ``t`` (a signed volume changes sign under
a mirror image) and fades out where the data are noise (``alpha -> 0``), so the prior
``N(0, I)`` at ``t = 1`` is left as it was. The features overlap (a bond and the 1-3
distances around it constrain the same atoms), so each one alone at its measured variance
would make the molecule too stiff; the gains ``g_f`` (learned, starting at ``gain``) take
that out, and a network adds what the prior misses. With ``gain_scales`` ``s_k`` the gains
depend on t, ``log g_f(t) = log g_f + sum_k c_fk s_k^2 / (sigma(t)^2 + s_k^2)`` (``c``
learned, starting at 0): each term switches on once the noise is narrower than ``s_k``,
so stiff coordinates can sharpen at small t even where the network's time is floored. The statistics are tabulated on a grid
``t_k = (k / (G - 1))^2`` and interpolated linearly.
"""
from __future__ import annotations

import torch

from ..coordinates import centre, subspace_noise

__all__ = ["FeaturePrior", "fit_prior", "graph_features", "signed_volumes"]


def graph_features(bonds, n_atoms: int):
    """Stiff coordinates of a bond graph.

    Parameters
    ----------
    bonds : iterable of (int, int)
    n_atoms : int

    Returns
    -------
    pairs : list of (int, int)
        Bonded and 1-3 pairs, each once, ``i < j``.
    centres : list of (int, int, int, int)
        ``(c, a, b, d)`` for each atom ``c`` with three or more neighbours, ``a < b < d``
        its three lowest-index neighbours; the signed volume is
        ``((a - c) x (b - c)) . (d - c)``.
    """
    nbr = [set() for _ in range(n_atoms)]
    pairs = set()
    for a, b in bonds:
        a, b = int(a), int(b)
        if a == b or not (0 <= a < n_atoms and 0 <= b < n_atoms):
            raise ValueError(f"bad bond ({a}, {b}) for {n_atoms} atoms")
        nbr[a].add(b)
        nbr[b].add(a)
        pairs.add((min(a, b), max(a, b)))
    for j in range(n_atoms):
        for i in nbr[j]:
            for k in nbr[j]:
                if i < k:
                    pairs.add((i, k))
    centres = [(c, *sorted(nbr[c])[:3]) for c in range(n_atoms) if len(nbr[c]) >= 3]
    return sorted(pairs), centres


def signed_volumes(p: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``((a - c) x (b - c)) . (e - c)`` for each row ``(c, a, b, e)`` of ``centres`` (V, 4).

    ``p`` has shape (B, N, 3); returns (B, V). Odd under a mirror image.
    """
    c, a, b, e = (p[:, centres[:, m]] for m in range(4))
    return (torch.cross(a - c, b - c, dim=-1) * (e - c)).sum(-1)


def _features(p: torch.Tensor, pair_i, pair_j, centres, eps: float,
              has_centres: bool) -> torch.Tensor:
    """Distances and signed volumes of positions ``p`` (B, N, 3), shape (B, F)."""
    d = p[:, pair_i] - p[:, pair_j]
    feats = [torch.sqrt((d * d).sum(-1) + eps ** 2)]
    if has_centres:
        feats.append(signed_volumes(p, centres))
    return torch.cat(feats, dim=-1)


class FeaturePrior(torch.nn.Module):
    """Harmonic prior on distances and signed volumes with tabulated, diffused statistics.

    Parameters
    ----------
    n_particles : int
    pairs : sequence of (int, int)
    centres : sequence of (int, int, int, int)
    mean, var : array-like, shape (G, F)
        Feature means and variances (model units) on the grid ``t_k = (k/(G-1))^2``;
        ``F = len(pairs) + len(centres)``.
    sde : LinearSDE
        Supplies ``alpha(t)`` for the fade-out.
    gain : float
        Initial value of every learnable gain ``g_f``.
    gain_scales : sequence of float
        Noise scales ``s_k`` (model units) of the gains' time dependence; empty (default)
        for constant gains.

    Use :meth:`fit` to measure ``mean`` and ``var`` from data.
    """

    eps = 1e-3

    def __init__(self, n_particles: int, pairs, centres, mean, var, sde, gain: float = 0.3,
                 gain_scales=()):
        super().__init__()
        pairs = [tuple(int(a) for a in q) for q in pairs]
        centres = [tuple(int(a) for a in q) for q in centres]
        for q in pairs + centres:
            if min(q) < 0 or max(q) >= n_particles or len(set(q)) != len(q):
                raise ValueError(f"bad feature atoms {q} for {n_particles} particles")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        var = torch.as_tensor(var, dtype=torch.float32)
        n_feat = len(pairs) + len(centres)
        if mean.dim() != 2 or mean.shape != var.shape or mean.shape[1] != n_feat \
                or mean.shape[0] < 2:
            raise ValueError(f"prior tables must have shape (G >= 2, {n_feat}); got "
                             f"{tuple(mean.shape)} and {tuple(var.shape)}")
        if not (torch.isfinite(mean).all() and (var > 0).all()):
            raise ValueError("prior tables need finite means and positive variances")
        self.sde = sde
        self.n_particles = int(n_particles)
        self.pairs, self.centres = pairs, centres
        pij = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        self.register_buffer("pair_i", pij[:, 0].contiguous())
        self.register_buffer("pair_j", pij[:, 1].contiguous())
        self.register_buffer("centre_atoms", torch.tensor(centres, dtype=torch.int64)
                             .reshape(-1, 4))
        self.register_buffer("mean", mean)
        self.register_buffer("inv_var", 1.0 / var)
        self.n_grid = int(mean.shape[0])
        if not gain > 0:
            raise ValueError(f"gain must be positive, got {gain}")
        self.gain = float(gain)
        self.log_gain = torch.nn.Parameter(torch.full((n_feat,), float(gain)).log())
        self.gain_scales = [float(v) for v in gain_scales]
        if any(not v > 0 for v in self.gain_scales):
            raise ValueError(f"gain_scales must be positive, got {self.gain_scales}")
        self._has_gain_t = len(self.gain_scales) > 0
        # derived from the config, so not saved: files of constant-gain priors load as before
        self.register_buffer("gain_s2", torch.tensor(self.gain_scales, dtype=torch.float32)
                             ** 2, persistent=False)
        if self._has_gain_t:
            self.gain_coeffs = torch.nn.Parameter(torch.zeros(n_feat, len(self.gain_scales)))
        else:
            self.register_parameter("gain_coeffs", None)

    def config(self) -> dict:
        return {"pairs": [list(q) for q in self.pairs],
                "centres": [list(q) for q in self.centres],
                "mean": self.mean.tolist(), "var": (1.0 / self.inv_var).tolist(),
                "gain": self.gain, "gain_scales": list(self.gain_scales)}

    @classmethod
    def fit(cls, y0: torch.Tensor, n_particles: int, pairs, centres, sde, n_grid: int = 48,
            n_samples: int = 4096, seed: int = 0) -> "FeaturePrior":
        """Measure the diffused feature statistics of data.

        Parameters
        ----------
        y0 : torch.Tensor, shape (F, 3N)
            Data in model coordinates (centred here).
        n_particles : int
        pairs, centres : see :func:`graph_features`
        sde : LinearSDE
        n_grid : int
            Grid points in ``t``.
        n_samples : int
            Noised samples per grid point (frames are drawn with replacement).
        seed : int
        """
        if y0.dim() != 2 or y0.shape[1] != 3 * n_particles or y0.shape[0] < 2:
            raise ValueError(f"y0 must have shape (F >= 2, {3 * n_particles}), got "
                             f"{tuple(y0.shape)}")
        gen = torch.Generator().manual_seed(seed)
        y0 = centre(y0.double(), n_particles)
        probe = cls(n_particles, pairs, centres, torch.zeros(2, len(pairs) + len(centres)),
                    torch.ones(2, len(pairs) + len(centres)), sde).double()
        ts = torch.linspace(0, 1, n_grid, dtype=torch.float64) ** 2
        means, variances = [], []
        for t in ts:
            idx = torch.randint(0, y0.shape[0], (n_samples,), generator=gen)
            eps = subspace_noise((n_samples, y0.shape[1]), n_particles, generator=gen,
                                 dtype=torch.float64)
            tt = t.expand(n_samples)
            yt = sde.alpha(tt)[:, None] * y0[idx] + sde.sigma(tt)[:, None] * eps
            f = probe.features(yt)
            means.append(f.mean(0))
            variances.append(f.var(0))
        var = torch.stack(variances)
        var = torch.maximum(var, 1e-6 * var.max(0).values)   # a floor for flat directions
        return cls(n_particles, pairs, centres, torch.stack(means), var, sde)

    def features(self, y: torch.Tensor) -> torch.Tensor:
        """Feature values of model coordinates ``y`` (B, 3N), shape (B, F)."""
        p = y.reshape(y.shape[0], -1, 3)
        return _features(p, self.pair_i, self.pair_j, self.centre_atoms, self.eps,
                         len(self.centres) > 0)

    def volumes(self, p: torch.Tensor) -> torch.Tensor:
        """Signed volumes of positions ``p`` (B, N, 3) in model units, shape (B, V)."""
        return signed_volumes(p, self.centre_atoms)

    def statistics(self, t: torch.Tensor):
        """Interpolated ``(mean, 1/var)`` at times ``t`` (B,), each (B, F)."""
        pos = torch.sqrt(t.clamp(0.0, 1.0)) * (self.n_grid - 1)
        k = pos.detach().floor().clamp(0, self.n_grid - 2)
        frac = (pos - k)[:, None]
        k = k.long()
        mean = self.mean[k] * (1 - frac) + self.mean[k + 1] * frac
        inv_var = self.inv_var[k] * (1 - frac) + self.inv_var[k + 1] * frac
        return mean, inv_var

    def weights(self, t: torch.Tensor):
        """``(mean, w)`` at times ``t`` (B,), each (B, F): ``E = 1/2 sum_f w_f (phi_f - m_f)^2``,
        ``w_f = alpha^2 g_f(t) / v_f(t)``."""
        mean, inv_var = self.statistics(t)
        log_g = self.log_gain.to(t.dtype)[None, :]
        if self._has_gain_t:
            s2 = self.gain_s2.to(t.dtype)
            basis = s2 / (self.sde.sigma2(t)[:, None] + s2)                  # (B, K)
            log_g = log_g + basis @ self.gain_coeffs.to(t.dtype).T
        return mean, inv_var * log_g.exp() * self.sde.alpha(t)[:, None] ** 2

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Prior energy in kT, shape (B,)."""
        f = self.features(y.to(self.mean.dtype))
        mean, w = self.weights(t.to(self.mean.dtype))
        return 0.5 * ((f - mean) ** 2 * w).sum(-1)


def fit_prior(positions, bonds, length_scale: float, sde, n_grid: int = 48,
              n_samples: int = 4096, seed: int = 0, gain_scales=()) -> dict:
    """Fit a :class:`FeaturePrior` to training positions; returns its ``config()``.

    Parameters
    ----------
    positions : array-like, shape (F, N, 3)
        Training configurations, nm.
    bonds : iterable of (int, int)
        Bond graph of the N particles (for coarse-grained beads: bonded beads).
    length_scale : float
        The model's length scale, nm.
    sde : LinearSDE
    n_grid, n_samples, seed
        See :meth:`FeaturePrior.fit`.
    gain_scales : sequence of float
        See :class:`FeaturePrior`.

    Returns
    -------
    dict
        Pass as ``MoleculeEnergy(..., prior=...)``.
    """
    x = torch.as_tensor(positions, dtype=torch.float64)
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"positions must have shape (F, N, 3), got {tuple(x.shape)}")
    n = x.shape[1]
    pairs, centres = graph_features(bonds, n)
    if not pairs:
        raise ValueError("a prior needs at least one bond")
    y0 = (x - x.mean(1, keepdim=True)).reshape(x.shape[0], -1) / float(length_scale)
    config = FeaturePrior.fit(y0, n, pairs, centres, sde, n_grid=n_grid, n_samples=n_samples,
                              seed=seed).config()
    return dict(config, gain_scales=[float(v) for v in gain_scales])
