"""Exact Laplacians of the package's energy networks in one forward pass.

Forward-Laplacian propagation carries, for every activation, its value ``h``, its
derivatives along C directions ``J`` (C = D coordinates, or K probes) and a second-order
term ``L`` through the network:

- input features (pairwise distances, damped torsion cos/sin, time features): value,
  sparse Jacobian (a distance depends on 6 coordinates, a torsion on 12) and Laplacian,
  analytic for distances, by the same propagation through the torsion formula on the
  12 coordinates of each torsion (:func:`openmm_diffenergy.ops.torsion_jet`); time
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
            tv, tfirst, tsecond = ops.torsion_jet(p, quads, model.eps, model.torsion_soft)
            firsts.append(tfirst)
        else:
            columns = directions[:, :, quads].permute(1, 2, 3, 4, 0)      # (B, Q, 4, 3, K)
            tv, tfirst, tsecond = ops.torsion_jet_torch(p, quads, model.eps, model.torsion_soft,
                                                        columns)
            firsts.append(tfirst.permute(0, 3, 1, 2).reshape(B, -1, 2 * Q))
        values.append(tv.reshape(B, 2 * Q))             # all cos, then all sin
        seconds.append(tsecond.reshape(B, 2 * Q))
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
