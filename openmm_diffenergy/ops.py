"""The ``diffenergy`` operator library (``cpp/``) and its pure-torch fallback.

Two operators carry the value ``h``, a C-column Jacobian ``J`` and a second-order term
``L`` (the Laplacian, or a sum of probe quadratic forms) through one SiLU layer
``a = silu(W h + b)`` (forward-Laplacian propagation):

- ``z = W h + b``, ``Jz = W J``, ``Lz = W L``;
- ``a = silu(z)``, ``J_a = silu'(z) Jz``, ``L_a = silu'(z) Lz + silu''(z) sum_c Jz^2``.

:func:`linear_silu_laplacian` takes a dense ``J``; :func:`sparse_linear_silu_laplacian`
takes the Jacobian of the network's input features as a list of nonzero entries
(each feature depends on a few coordinates only), so the first layer costs
``O(entries * H)`` instead of ``O(F * C * H)``. A third, :func:`torsion_jet`, gives the
damped torsion features of the energy network with their 12-coordinate Jacobians and
Laplacians.

The compiled library is built by ``pip install`` (``setup.py`` runs CMake on
``CMakeLists.txt``) and loaded when this module is imported; its operators are
``torch.ops.diffenergy.*`` and can be called from TorchScript. Where it is absent the
wrappers run the same rule in plain torch and warn once. Set the environment variable
``DIFFENERGY_DISABLE_OPS=1`` (before import) or use :func:`torch_fallback` to force the
plain-torch version; ``DIFFENERGY_OPS_LIBRARY`` names a library file to load instead of
the one next to this module.

The compiled operators have no derivative: they serve divergence evaluation under
``torch.no_grad``, and a backward pass through them raises instead of returning wrong
gradients. Inside :func:`torch_fallback` everything is plain torch and differentiable.
"""
from __future__ import annotations

import contextlib
import glob
import os
import warnings

import torch

__all__ = ["available", "cuda_available", "library_path", "load_error", "torch_fallback",
           "using_ops", "linear_silu_laplacian", "sparse_linear_silu_laplacian",
           "torsion_jet", "linear_silu_laplacian_torch", "sparse_linear_silu_laplacian_torch",
           "torsion_jet_torch"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_state = {"path": None, "error": None, "warned": False,
          "force_torch": os.environ.get("DIFFENERGY_DISABLE_OPS", "") not in ("", "0")}


def _candidates() -> list:
    env = os.environ.get("DIFFENERGY_OPS_LIBRARY")
    if env:
        return [env]
    names = sorted(glob.glob(os.path.join(_HERE, "_diffenergy_ops*.so")))
    root = os.path.dirname(_HERE)   # a CMake build beside a source checkout
    names += sorted(glob.glob(os.path.join(root, "build", "cmake*", "libdiffenergy_ops.so")))
    names += sorted(glob.glob(os.path.join(root, "build", "libdiffenergy_ops.so")))
    return names


def _load() -> None:
    if _state["force_torch"]:
        _state["error"] = "disabled by DIFFENERGY_DISABLE_OPS"
        return
    names = _candidates()
    if not names:
        _state["error"] = ("the compiled library was not built (reinstall with "
                           "`pip install --no-build-isolation -e .` and a C++ compiler and CMake)")
        return
    try:
        torch.ops.load_library(names[0])
    except (OSError, RuntimeError) as err:
        _state["error"] = f"loading {names[0]} failed: {str(err).splitlines()[0]}"
        return
    _state["path"] = names[0]


_load()


def available() -> bool:
    """Whether the compiled ``diffenergy`` operators are loaded."""
    return _state["path"] is not None


def cuda_available() -> bool:
    """Whether the loaded library has CUDA kernels (it was built with a matching toolkit)."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "diffenergy::linear_silu_laplacian", "CUDA")


def library_path() -> str | None:
    """File the operators were loaded from, or ``None``."""
    return _state["path"]


def load_error() -> str | None:
    """Why the library is not loaded (``None`` when it is)."""
    return _state["error"]


def using_ops() -> bool:
    """Whether the wrappers call the compiled operators now (loaded and not forced off)."""
    return available() and not _state["force_torch"]


@contextlib.contextmanager
def torch_fallback(enabled: bool = True):
    """Context manager: run the plain-torch versions of the operators (``enabled=True``)."""
    previous = _state["force_torch"]
    _state["force_torch"] = bool(enabled)
    try:
        yield
    finally:
        _state["force_torch"] = previous


def _use_ops() -> bool:
    if _state["force_torch"]:
        return False
    if available():
        return True
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"openmm_diffenergy: C++ operators unavailable ({_state['error']}); "
                      "using the plain-torch forward Laplacian", RuntimeWarning, stacklevel=3)
    return False


def _silu_rule(z, Jz, Lz):
    s = torch.sigmoid(z)
    d1 = s * (1 + z * (1 - s))                       # silu'
    d2 = s * (1 - s) * (2 + z * (1 - 2 * s))         # silu''
    return z * s, d1[:, None, :] * Jz, d1 * Lz + d2 * (Jz * Jz).sum(1)


def linear_silu_laplacian_torch(h, J, L, W, b):
    """Plain-torch :func:`linear_silu_laplacian` (the fallback and the reference)."""
    Wt = W.t()
    return _silu_rule(torch.addmm(b, h, Wt), J @ Wt, L @ Wt)


def _dense_feature_jacobian(vals, feat, coord, n_features: int, n_cols: int):
    """Dense (B, C, F) Jacobian from its nonzero entries (repeated entries add up)."""
    J = vals.new_zeros(vals.shape[0], n_cols * n_features)
    J.index_add_(1, coord * n_features + feat, vals)
    return J.view(vals.shape[0], n_cols, n_features)


def sparse_linear_silu_laplacian_torch(h, vals, feat, coord, L, W, b, n_cols: int):
    """Plain-torch :func:`sparse_linear_silu_laplacian` (dense Jacobian, then one matmul)."""
    J = _dense_feature_jacobian(vals, feat, coord, h.shape[1], int(n_cols))
    return linear_silu_laplacian_torch(h, J, L, W, b)


def linear_silu_laplacian(h, J, L, W, b):
    """One SiLU layer of forward-Laplacian propagation.

    Parameters
    ----------
    h : torch.Tensor, shape (B, H_in)
        Layer input.
    J : torch.Tensor, shape (B, C, H_in)
        Its derivatives along C directions (C = D coordinates for the exact Laplacian,
        K probes for Hutchinson), column-major per sample: ``J[b, c, i] = d h_i / d u_c``.
    L : torch.Tensor, shape (B, H_in)
        Its second-order term: Laplacian, or sum of ``v^T Hess(h_i) v`` over the C probes.
    W : torch.Tensor, shape (H_out, H_in)
    b : torch.Tensor, shape (H_out,)
        Weight and bias of the linear map (``torch.nn.Linear`` layout). All tensors share
        one dtype (float32 or float64) and one device.

    Returns
    -------
    h_out : torch.Tensor, shape (B, H_out)
        ``silu(h W^T + b)``.
    J_out : torch.Tensor, shape (B, C, H_out)
    L_out : torch.Tensor, shape (B, H_out)
    """
    if _use_ops():
        return torch.ops.diffenergy.linear_silu_laplacian(h, J, L, W, b)
    return linear_silu_laplacian_torch(h, J, L, W, b)


def sparse_linear_silu_laplacian(h, vals, feat, coord, L, W, b, n_cols: int):
    """First SiLU layer, with the input Jacobian given by its nonzero entries.

    Parameters
    ----------
    h : torch.Tensor, shape (B, F)
        Input features.
    vals : torch.Tensor, shape (B, E)
        Nonzero entries of the feature Jacobian: ``d h[feat[e]] / d u[coord[e]] = vals[:, e]``
        (entries with the same ``(feat, coord)`` add up).
    feat : torch.Tensor of int64, shape (E,)
        Feature index of each entry, in ``[0, F)``.
    coord : torch.Tensor of int64, shape (E,)
        Coordinate (column) index of each entry, in ``[0, n_cols)``.
    L : torch.Tensor, shape (B, F)
        Laplacians of the features.
    W : torch.Tensor, shape (H, F)
    b : torch.Tensor, shape (H,)
    n_cols : int
        Number of coordinates C (``3N`` for particles).

    Returns
    -------
    h_out : torch.Tensor, shape (B, H)
    J_out : torch.Tensor, shape (B, C, H)
    L_out : torch.Tensor, shape (B, H)
    """
    if _use_ops():
        return torch.ops.diffenergy.sparse_linear_silu_laplacian(h, vals, feat, coord, L, W, b,
                                                                  int(n_cols))
    return sparse_linear_silu_laplacian_torch(h, vals, feat, coord, L, W, b, n_cols)


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
    comps = [a[i] * b[k] - a[k] * b[i] for i, k in ((1, 2), (2, 0), (0, 1))]
    return _Jet(torch.stack([c.v for c in comps], -1), torch.stack([c.j for c in comps], -2),
                torch.stack([c.l for c in comps], -1))


def torsion_jet_torch(p, quads, eps: float, soft: float, columns=None):
    """Plain-torch :func:`torsion_jet`, along any columns.

    ``columns`` (B, Q, 4, 3, C) are the derivatives of the 4 atoms' coordinates along C
    directions; by default the 12 unit vectors (then ``second`` is the Laplacian), else
    ``second`` is the sum over the columns of the second directional derivatives.
    """
    B, Q = p.shape[0], quads.shape[0]
    if columns is None:
        columns = torch.eye(12, dtype=p.dtype, device=p.device).reshape(4, 3, 12)
        columns = columns.expand(B, Q, 4, 3, 12)
    zero = p.new_zeros(()).expand(B, Q, 3)
    a, b, c, d = (_Jet(p[:, quads[:, m]], columns[:, :, m], zero) for m in range(4))
    b1, b2, b3 = b - a, c - b, d - c
    n1 = _cross(b1, b2)
    n2 = _cross(b2, b3)
    b2n = b2 * _reciprocal(_sqrt(_dot(b2, b2) + eps ** 2)).unsqueeze()
    m1 = _cross(n1, b2n)
    x = _dot(n1, n2)
    y = _dot(m1, n2)
    inv_r = _reciprocal(_sqrt(x * x + y * y + (eps ** 4 + soft ** 2)))
    cos, sin = x * inv_r, y * inv_r
    return (torch.stack([cos.v, sin.v], 1), torch.stack([cos.j, sin.j], 1),
            torch.stack([cos.l, sin.l], 1))


def torsion_jet(p, quads, eps: float, soft: float):
    """Damped torsion cos/sin features with their 12-coordinate Jacobians and Laplacians.

    The features of :class:`~openmm_diffenergy.MoleculeEnergy`: with ``b1 = b - a``,
    ``b2 = c - b``, ``b3 = d - c``, ``n1 = b1 x b2``, ``n2 = b2 x b3``,
    ``m1 = n1 x b2 / sqrt(|b2|^2 + eps^2)``, ``x = n1.n2``, ``y = m1.n2``:
    ``(cos, sin) = (x, y) / sqrt(x^2 + y^2 + eps^4 + soft^2)``.

    Parameters
    ----------
    p : torch.Tensor, shape (B, N, 3)
        Positions (model coordinates), float32 or float64.
    quads : torch.Tensor of int64, shape (Q, 4)
        Atom indices (a, b, c, d) of each torsion.
    eps, soft : float
        Regularization lengths (model units) and damping (model units^2).

    Returns
    -------
    value : torch.Tensor, shape (B, 2, Q)
        cos (index 0) and sin (index 1).
    jac : torch.Tensor, shape (B, 2, Q, 12)
        Derivatives over the coordinates ``(a_x, a_y, a_z, b_x, ..., d_z)``.
    lap : torch.Tensor, shape (B, 2, Q)
        Laplacians over those 12 coordinates.
    """
    if _use_ops():
        return torch.ops.diffenergy.torsion_jet(p, quads, float(eps), float(soft))
    return torsion_jet_torch(p, quads, eps, soft)


def _no_derivative(ctx, *grads):
    raise RuntimeError("the diffenergy operators have no derivative; differentiate inside "
                       "openmm_diffenergy.ops.torch_fallback() instead")


if available():
    for _name in ("linear_silu_laplacian", "sparse_linear_silu_laplacian", "torsion_jet"):
        torch.library.register_autograd(f"diffenergy::{_name}", _no_derivative)

    @torch.library.register_fake("diffenergy::linear_silu_laplacian")
    def _linear_fake(h, J, L, W, b):
        torch._check(h.dim() == 2 and J.dim() == 3 and W.dim() == 2)
        B, C, H = h.shape[0], J.shape[1], W.shape[0]
        return h.new_empty(B, H), J.new_empty(B, C, H), L.new_empty(B, H)

    @torch.library.register_fake("diffenergy::sparse_linear_silu_laplacian")
    def _sparse_fake(h, vals, feat, coord, L, W, b, n_cols):
        torch._check(h.dim() == 2 and vals.dim() == 2 and W.dim() == 2)
        B, H = h.shape[0], W.shape[0]
        return h.new_empty(B, H), h.new_empty(B, n_cols, H), L.new_empty(B, H)

    @torch.library.register_fake("diffenergy::torsion_jet")
    def _torsion_fake(p, quads, eps, soft):
        torch._check(p.dim() == 3 and quads.dim() == 2)
        B, Q = p.shape[0], quads.shape[0]
        return p.new_empty(B, 2, Q), p.new_empty(B, 2, Q, 12), p.new_empty(B, 2, Q)
