"""Exact Laplacians of the package's energy networks in one forward pass.

Forward-Laplacian propagation carries, for every activation, its value ``h``, its
derivatives along C directions ``J`` (C = D coordinates, or K probes) and a second-order
term ``L`` through the network:

- input features (pairwise distances, damped torsion cos/sin, time features): value,
  sparse Jacobian (a distance depends on 6 coordinates, a torsion on 12) and Laplacian,
  analytic for distances, by the same propagation through the torsion formula on the
  12 coordinates of each torsion; time
  features have no spatial derivative;
- each SiLU layer: the fused rule of :mod:`openmm_diffenergy.ops`;
- the linear read-out, the ``1/sqrt(sigma^2 + 1e-4)`` output scale and the Gaussian
  baseline ``|y_c|^2 / (2 v)``, whose Laplacian on ``R^{3N}`` is ``3 (N - 1) / v``.

With the D unit vectors as directions this gives the energy, its gradient and the exact
Laplacian; with K probe vectors it gives ``sum_k v_k^T Hess(E) v_k`` (Hutchinson).
Everything runs in the model's parameter dtype, like the model's own ``forward``, and
is returned in the dtype of ``y``.
"""
from __future__ import annotations

import torch

from . import ops
from .models.mlp import DistanceMLPEnergy
from .models.molecule import MoleculeEnergy

__all__ = ["supports", "forward_laplacian"]

_RULES = (MoleculeEnergy, DistanceMLPEnergy)


def supports(model) -> bool:
    """Whether ``model`` has a forward-Laplacian rule (MoleculeEnergy, DistanceMLPEnergy)."""
    return isinstance(model, _RULES)


def _distance_jet(p, pair_i, pair_j, eps, directions):
    """Distances ``d = sqrt(|p_i - p_j|^2 + eps^2)`` with first and second derivatives.

    Returns the value (B, P); the Jacobian entries (B, P, 6) for coordinates
    ``[3i..3i+2, 3j..3j+2]``, or with ``directions`` (K, B, N, 3) the derivatives along
    them (B, K, P); and the Laplacian (B, P), or the sum over the directions of
    ``w^T Hess w``, ``w = v_i - v_j``, ``Hess = (I - r r^T / d^2) / d``.
    """
    r = p[:, pair_i] - p[:, pair_j]
    r2 = (r * r).sum(-1)
    d = torch.sqrt(r2 + eps ** 2)
    u = r / d[..., None]
    if directions is None:
        return d, torch.cat([u, -u], dim=-1), 2 * (3 - r2 / d ** 2) / d
    w = directions[:, :, pair_i] - directions[:, :, pair_j]              # (K, B, P, 3)
    second = (((w * w).sum(-1) - (w * r).sum(-1) ** 2 / d ** 2) / d).sum(0)
    return d, (w * u).sum(-1).transpose(0, 1), second


class _Jet:
    """A value with its derivatives along C columns and its second-order term.

    ``v`` has shape S, ``j`` shape S + (C,), ``l`` shape S: ``l`` is the sum over the
    columns of the second directional derivatives (the Laplacian when the columns are
    unit vectors). Products and smooth functions follow the forward-Laplacian rules
    ``l(ab) = a l(b) + b l(a) + 2 j(a).j(b)`` and ``l(f(a)) = f' l(a) + f'' |j(a)|^2``.
    """

    __slots__ = ("v", "j", "l")

    def __init__(self, v, j, l_):
        self.v, self.j, self.l = v, j, l_

    def __add__(self, other):
        if isinstance(other, _Jet):
            return _Jet(self.v + other.v, self.j + other.j, self.l + other.l)
        return _Jet(self.v + other, self.j, self.l)

    def __sub__(self, other):
        return _Jet(self.v - other.v, self.j - other.j, self.l - other.l)

    def __mul__(self, other):
        return _Jet(self.v * other.v, self.j * other.v[..., None] + other.j * self.v[..., None],
                    self.l * other.v + other.l * self.v + 2 * (self.j * other.j).sum(-1))

    def __getitem__(self, index):       # index the last value axis (vector components)
        return _Jet(self.v[..., index], self.j[..., index, :], self.l[..., index])

    def fn(self, f, d1, d2):
        """``f(self)`` given the values of ``f``, ``f'`` and ``f''`` at ``self.v``."""
        return _Jet(f, d1[..., None] * self.j, d1 * self.l + d2 * (self.j * self.j).sum(-1))

    def unsqueeze(self):
        """Broadcast a scalar jet against 3-vectors."""
        return _Jet(self.v[..., None], self.j[..., None, :], self.l[..., None])


def _sqrt(a: _Jet) -> _Jet:
    f = torch.sqrt(a.v)
    return a.fn(f, 0.5 / f, -0.25 / f ** 3)


def _reciprocal(a: _Jet) -> _Jet:
    f = 1 / a.v
    return a.fn(f, -f * f, 2 * f ** 3)


def _dot(a: _Jet, b: _Jet) -> _Jet:
    p = a * b
    return _Jet(p.v.sum(-1), p.j.sum(-2), p.l.sum(-1))


def _cross(a: _Jet, b: _Jet) -> _Jet:
    i, k = [1, 2, 0], [2, 0, 1]
    return a[i] * b[k] - a[k] * b[i]


def _torsion_jet(p, quads, eps, soft, columns):
    """Damped torsion cos and sin as jets, the formula of ``_torsion_cos_sin``.

    ``columns`` (B, Q, 4, 3, C): derivatives of the 4 atoms' coordinates along the C
    columns. Returns the cos and sin jets, values of shape (B, Q).
    """
    zero = p.new_zeros(())
    a, b, c, d = (_Jet(p[:, quads[:, m]], columns[:, :, m], zero.expand(p.shape[0],
                  quads.shape[0], 3)) for m in range(4))
    b1, b2, b3 = b - a, c - b, d - c
    n1 = _cross(b1, b2)
    n2 = _cross(b2, b3)
    b2n = b2 * _reciprocal(_sqrt(_dot(b2, b2) + eps ** 2)).unsqueeze()
    m1 = _cross(n1, b2n)
    x = _dot(n1, n2)
    y = _dot(m1, n2)
    inv_r = _reciprocal(_sqrt(x * x + y * y + (eps ** 4 + soft ** 2)))
    return x * inv_r, y * inv_r


def _feature_jet(model, p, t, directions):
    """Input features of ``model`` with their first and second derivatives.

    Returns ``(h, first, second)``: values (B, F); without ``directions`` the Jacobian
    as entries ``(vals, feat, coord)``, ``vals`` (B, E) being ``d h[:, feat[e]] /
    d y[:, coord[e]]``, with ``directions`` (K, B, N, 3) the derivatives along them
    (B, K, F); and the Laplacians, or sums of probe quadratic forms, (B, F).
    """
    B, dev = p.shape[0], p.device
    n_pairs = model.pair_i.shape[0]
    d, dist_first, dist_second = _distance_jet(p, model.pair_i, model.pair_j, model.eps,
                                               directions)
    values, firsts, seconds = [d], [dist_first], [dist_second]
    quads = model.quads if getattr(model, "_has_torsions", False) else None
    if quads is not None:
        Q = quads.shape[0]
        if directions is None:
            columns = torch.eye(12, dtype=p.dtype, device=dev).reshape(4, 3, 12)
            columns = columns.expand(B, Q, 4, 3, 12)
        else:
            columns = directions[:, :, quads].permute(1, 2, 3, 4, 0)      # (B, Q, 4, 3, K)
        cos, sin = _torsion_jet(p, quads, model.eps, model.torsion_soft, columns)
        values += [cos.v, sin.v]
        seconds += [cos.l, sin.l]
        if directions is None:
            firsts += [cos.j, sin.j]
        else:
            firsts += [cos.j.transpose(1, 2), sin.j.transpose(1, 2)]
    tt = t.to(p.dtype)[:, None]
    values += [tt, torch.sin(tt * model.frequencies), torch.cos(tt * model.frequencies)]
    n_time = 1 + 2 * model.frequencies.shape[0]
    seconds.append(p.new_zeros(B, n_time))
    h, second = torch.cat(values, 1), torch.cat(seconds, 1)
    if directions is not None:
        firsts.append(p.new_zeros(B, directions.shape[0], n_time))
        return h, torch.cat(firsts, 2), second
    xyz = torch.arange(3, device=dev)
    coords = [torch.cat([3 * model.pair_i[:, None] + xyz, 3 * model.pair_j[:, None] + xyz], 1)]
    feats = [torch.arange(n_pairs, device=dev).repeat_interleave(6)]
    if quads is not None:
        coords.append((3 * quads[:, :, None] + xyz).reshape(Q, 12).repeat(2, 1))
        feats.append((n_pairs + torch.arange(2 * Q, device=dev)).repeat_interleave(12))
    vals = torch.cat([f.reshape(B, -1) for f in firsts], 1)
    return h, (vals, torch.cat(feats), torch.cat([c.reshape(-1) for c in coords])), second


def forward_laplacian(model, y: torch.Tensor, t: torch.Tensor, directions=None):
    """Energy, gradient and Laplacian of ``model(y, t)`` in one forward pass.

    Parameters
    ----------
    model : MoleculeEnergy or DistanceMLPEnergy
    y : torch.Tensor, shape (B, 3N)
        Model coordinates (positions / length scale, dimensionless).
    t : torch.Tensor, shape (B,)
        Diffusion times.
    directions : torch.Tensor, shape (K, B, 3N), optional
        Probe vectors. Without them the D = 3N unit vectors are used (exact Laplacian).

    Returns
    -------
    energy : torch.Tensor, shape (B,)
        ``E(y, t)`` in kT.
    grad : torch.Tensor, shape (B, 3N) or None
        ``dE/dy`` (``None`` with ``directions``: the columns are then probe derivatives).
    second : torch.Tensor, shape (B,)
        The Laplacian ``sum_i d^2 E / dy_i^2``, or with ``directions`` the sum over the K
        probes of ``v_k^T Hess(E) v_k``.

    Raises
    ------
    ValueError
        If the model has no forward-Laplacian rule.
    """
    if not supports(model):
        raise ValueError(f"no forward-Laplacian rule for {type(model).__name__}; the fast "
                         "divergence supports MoleculeEnergy and DistanceMLPEnergy")
    out_dtype = y.dtype
    dt = model.frequencies.dtype
    B, D = y.shape
    p = y.to(dt).reshape(B, -1, 3)
    if directions is not None:
        directions = directions.to(dt).reshape(directions.shape[0], B, -1, 3)
    h, first, second = _feature_jet(model, p, t, directions)
    lin = model.linears
    if directions is None:
        h, J, L = ops.sparse_linear_silu_laplacian(h, *first, second, lin[0].weight,
                                                   lin[0].bias, D)
    else:
        h, J, L = ops.linear_silu_laplacian(h, first, second, lin[0].weight, lin[0].bias)
    for layer in lin[1:-1]:
        h, J, L = ops.linear_silu_laplacian(h, J, L, layer.weight, layer.bias)
    w = lin[-1].weight[0]
    energy = h @ w + lin[-1].bias[0]
    cols = J @ w                                                       # (B, C)
    second = L @ w
    if isinstance(model, MoleculeEnergy):
        tt = t.to(dt)
        s2 = model.sde.sigma2(tt)
        v = model.sde.alpha(tt) ** 2 + s2
        if model._scale_output:
            c = torch.sqrt(s2 + 1e-4)
            energy, cols, second = energy / c, cols / c[:, None], second / c
        yc = p - p.mean(dim=1, keepdim=True)
        energy = energy + 0.5 * (yc * yc).sum((1, 2)) / v
        n = p.shape[1]
        if directions is None:
            cols = cols + yc.reshape(B, D) / v[:, None]
            second = second + 3 * (n - 1) / v
        else:
            vc = directions - directions.mean(dim=2, keepdim=True)
            second = second + (vc * vc).sum((0, 2, 3)) / v
    grad = cols.to(out_dtype) if directions is None else None
    return energy.to(out_dtype), grad, second.to(out_dtype)
