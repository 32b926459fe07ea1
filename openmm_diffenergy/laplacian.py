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
- the linear read-out, the ``1/c(t)`` output scale and the Gaussian
  baseline ``|y_c|^2 / (2 v)``, whose Laplacian on ``R^{3N}`` is ``3 (N - 1) / v``;
- where the model has one, its fitted prior term (a cheap quadratic in distances and
  signed volumes), by ``torch.func``, and signed volumes as network inputs (analytic).

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


def _volume_jet(p, centres, directions):
    """Signed volumes ``((a - c) x (b - c)) . (e - c)``, rows ``(c, a, b, e)`` of ``centres``.

    A volume is affine in each atom's position, so its Laplacian is 0; along a direction
    ``w`` its second derivative is ``2 (det[da, db, e-c] + det[da, b-c, de] +
    det[a-c, db, de])`` with ``da = w_a - w_c`` etc. Returns value (B, V), Jacobian
    entries (B, V, 12) over the coordinates of (c, a, b, e) or derivatives along the
    directions (B, K, V), and the second-order term (B, V).
    """
    c, a, b, e = (p[:, centres[:, m]] for m in range(4))
    ac, bc, ec = a - c, b - c, e - c
    n = torch.cross(ac, bc, dim=-1)
    value = (n * ec).sum(-1)
    ga, gb = torch.cross(bc, ec, dim=-1), torch.cross(ec, ac, dim=-1)
    if directions is None:
        return value, torch.cat([-(ga + gb + n), ga, gb, n], -1), torch.zeros_like(value)
    wc, wa, wb, we = (directions[:, :, centres[:, m]] for m in range(4))   # (K, B, V, 3)
    da, db, de = wa - wc, wb - wc, we - wc
    first = (ga * da + gb * db + n * de).sum(-1)
    second = 2 * ((torch.cross(da, db, dim=-1) * ec).sum(-1)
                  + (torch.cross(da, bc.expand_as(da), dim=-1) * de).sum(-1)
                  + (torch.cross(ac.expand_as(db), db, dim=-1) * de).sum(-1))
    return value, first.transpose(0, 1), second.sum(0)


def _autograd_jet(fn, y, t, directions):
    """Value, gradient and Laplacian (or probe quadratic forms) of a cheap energy term.

    By ``torch.func``: one Hessian-vector product per coordinate (or probe), vectorized.
    Used for the small prior term of :class:`MoleculeEnergy`, whose features overlap the
    network's only in part.
    """
    grad_fn = torch.func.grad(lambda yy: fn(yy, t).sum())
    grad, hvp = torch.func.vjp(grad_fn, y)
    if directions is None:
        B, D = y.shape
        directions = torch.eye(D, dtype=y.dtype, device=y.device)[:, None, :].expand(D, B, D)
    hv = torch.func.vmap(hvp)(directions)[0]
    return fn(y, t), grad, (hv * directions).sum((0, 2))


def _prior_jet(prior, y, t, directions):
    """The fitted prior ``E = alpha^2/2 sum_f w_f (phi_f - m_f)^2`` of MoleculeEnergy.

    ``phi`` are its distances and signed volumes, ``w_f = g_f(t) / v_f(t)``. Gradient
    ``alpha^2 sum_f w_f r_f grad phi_f`` and Laplacian ``alpha^2 sum_f w_f (|grad phi_f|^2 +
    r_f lap phi_f)`` with ``r = phi - m``, from the feature jets. Returns ``None`` when
    the energy it gives differs from ``prior(y, t)`` (a prior this rule does not know);
    the caller then takes the ``torch.func`` route.
    """
    dt = prior.mean.dtype
    B, D = y.shape
    p = y.to(dt).reshape(B, -1, 3)
    if directions is not None:
        directions = directions.to(dt).reshape(directions.shape[0], B, -1, 3)
    phi, first, second = _distance_jet(p, prior.pair_i, prior.pair_j, prior.eps, directions)
    phis, firsts, seconds = [phi], [first], [second]
    n_pairs = phi.shape[1]
    if len(prior.centres) > 0:
        for part, value in zip((phis, firsts, seconds),
                               _volume_jet(p, prior.centre_atoms, directions)):
            part.append(value)
    phi, second = torch.cat(phis, 1), torch.cat(seconds, 1)
    tt = t.to(dt)
    mean, w = prior.weights(tt)
    r = phi - mean
    energy = 0.5 * (w * r * r).sum(-1)
    if not torch.allclose(energy, prior(y, t).to(dt), rtol=1e-4, atol=1e-6):
        return None
    if directions is not None:
        first = torch.cat(firsts, 2)                                     # (B, K, F)
        return energy, None, (w * ((first * first).sum(1) + r * second)).sum(-1)
    # exact: entries of grad phi on the coordinates of each feature's atoms
    xyz = torch.arange(3, device=y.device)
    coef = w * r
    grad = y.new_zeros(B, D, dtype=dt)
    idx = torch.cat([3 * prior.pair_i[:, None] + xyz, 3 * prior.pair_j[:, None] + xyz], 1)
    grad.index_add_(1, idx.reshape(-1), (coef[:, :n_pairs, None] * firsts[0]).reshape(B, -1))
    sq = [(firsts[0] * firsts[0]).sum(-1)]
    if len(firsts) > 1:
        vidx = (3 * prior.centre_atoms[:, :, None] + xyz).reshape(-1)
        grad.index_add_(1, vidx, (coef[:, n_pairs:, None] * firsts[1]).reshape(B, -1))
        sq.append((firsts[1] * firsts[1]).sum(-1))
    return energy, grad, (w * (torch.cat(sq, 1) + r * second)).sum(-1)


def _network_time(model, t):
    """The time the network sees (``MoleculeEnergy.network_time``; ``t`` for other models)."""
    return model.network_time(t) if hasattr(model, "network_time") else t


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
    centres = model.prior.centre_atoms if getattr(model, "_has_volumes", False) else None
    if centres is not None:
        vv, vfirst, vsecond = _volume_jet(p, centres, directions)
        values.append(vv)
        firsts.append(vfirst)
        seconds.append(vsecond)
    tf = model.time_features(_network_time(model, t).to(p.dtype))
    values.append(tf)
    n_time = tf.shape[1]
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
    if centres is not None:
        start = n_pairs + (2 * Q if quads is not None else 0)
        coords.append((3 * centres[:, :, None] + xyz).reshape(-1, 12))
        feats.append((start + torch.arange(centres.shape[0], device=dev)).repeat_interleave(12))
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
    if h.shape[1] != lin[0].in_features:
        raise ValueError(f"no forward-Laplacian rule for this {type(model).__name__}: its "
                         f"network takes {lin[0].in_features} features, the rule knows "
                         f"{h.shape[1]}")
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
            c = model.output_denominator(_network_time(model, t).to(dt))
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
        if getattr(model, "_has_prior", False):
            flat = None if directions is None else directions.reshape(-1, B, D).to(y.dtype)
            jet = _prior_jet(model.prior, y, t, flat)
            pe, pg, ps = jet if jet is not None else _autograd_jet(model.prior, y, t, flat)
            energy, second = energy + pe.to(dt), second + ps.to(dt)
            if directions is None:
                cols = cols + pg.to(dt)
    grad = cols.to(out_dtype) if directions is None else None
    return energy.to(out_dtype), grad, second.to(out_dtype)
