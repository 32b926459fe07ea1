"""The fast exact divergence (forward-Laplacian propagation) and the diffenergy operators.

Oracle: ExactDivergence, the autograd trace of the score's Jacobian. Tolerances: float64
forward propagation and autograd differ by round-off only (observed ~1e-14 relative),
so 1e-6 is a loose bound that still catches any missing term; float32 models are
compared with the float64 oracle of the same weights at 1e-4 (float32 round-off through
three layers and the 1/sigma output scale is ~1e-6 relative).
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import openmm_diffenergy as de
from openmm_diffenergy import laplacian, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ops = pytest.mark.skipif(not ops.available(), reason=f"no diffenergy ops: {ops.load_error()}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def _randomize(model, seed):
    """Non-zero biases and an O(1) read-out, so that every term of the rule is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in model.linears:
            lin.bias.copy_(0.3 * torch.randn(lin.bias.shape, generator=g))
        model.linears[-1].weight.copy_(torch.randn(model.linears[-1].weight.shape, generator=g))
    return model


def molecule(n=6, dtype=torch.float64, seed=0, prior=False, floor=0.0, gain_scales=(),
             **options):
    bonds = [(i, i + 1) for i in range(n - 1)] + [(1, n - 1)]      # atom 1 branches
    torsions = de.torsion_quadruples(bonds, n)
    config = None
    if prior:   # a fitted-prior model: random but valid statistics tables
        from openmm_diffenergy.models.prior import graph_features
        pairs, centres = graph_features(bonds, n)
        g = torch.Generator().manual_seed(seed)
        shape = (4, len(pairs) + len(centres))
        config = {"pairs": pairs, "centres": centres, "mean": torch.rand(shape, generator=g),
                  "var": 0.5 + torch.rand(shape, generator=g), "gain_scales": gain_scales}
    m = de.MoleculeEnergy(n, torsions=torsions, hidden=24, layers=3, n_frequencies=3, seed=seed,
                          prior=config, net_t_floor=floor, **options)
    if gain_scales:
        with torch.no_grad():
            m.prior.gain_coeffs.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return _randomize(m, seed).to(dtype)


def molecule_prior(dtype=torch.float64, seed=0):
    return molecule(dtype=dtype, seed=seed, prior=True)


def molecule_floor(dtype=torch.float64, seed=0):
    """Network time floored at 0.5: half of the batch's times lie below it."""
    return molecule(dtype=dtype, seed=seed, prior=True, floor=0.5)


def molecule_log_sigma(dtype=torch.float64, seed=0):
    """The log-sigma time feature and a wider output floor."""
    return molecule(dtype=dtype, seed=seed, prior=True, log_sigma_feature=True, sigma_out=0.05)


def molecule_gain_t(dtype=torch.float64, seed=0):
    """Time-dependent prior gains below a floored network time."""
    return molecule(dtype=dtype, seed=seed, prior=True, floor=0.5, gain_scales=(0.1, 0.5))


def distance_mlp(n=5, dtype=torch.float64, seed=0):
    return _randomize(de.DistanceMLPEnergy(n, hidden=20, layers=2, seed=seed), seed).to(dtype)


MODELS = {"molecule": molecule, "molecule_prior": molecule_prior,
          "molecule_floor": molecule_floor, "molecule_log_sigma": molecule_log_sigma,
          "molecule_gain_t": molecule_gain_t,
          "distance_mlp": distance_mlp}


def batch(model, b=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b, model.dim, generator=g, dtype=dtype)
    t = torch.linspace(0.02, 0.9, b, dtype=dtype)
    return y, t


def max_rel(a, b):
    return ((a - b).abs() / b.abs()).max().item()


@pytest.fixture(params=["ops", "torch"])
def backend(request):
    """Run a test with the compiled operators and with the plain-torch fallback."""
    if request.param == "ops" and not ops.available():
        pytest.skip(f"no diffenergy ops: {ops.load_error()}")
    with ops.torch_fallback(request.param == "torch"):
        yield request.param


def test_library_is_built_where_it_can_be():
    # make test installs with CMake and a C++ compiler present: the library must load
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("no CMake or C++ compiler here: the fallback is the expected state")
    if os.environ.get("DIFFENERGY_DISABLE_OPS", "") not in ("", "0"):
        pytest.skip("disabled by DIFFENERGY_DISABLE_OPS")
    assert ops.available(), ops.load_error()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fast_matches_autograd_float64(kind, backend):
    model = MODELS[kind]()
    y, t = batch(model)
    fn = de.score_fn(model)
    value, div = de.ExactDivergence()(fn, y, t)
    fvalue, fdiv = de.FastDivergence()(fn, y, t)
    assert max_rel(fdiv, div) <= 1e-6
    torch.testing.assert_close(fvalue, value, rtol=1e-10, atol=1e-10)
    energy, _, _ = laplacian.forward_laplacian(model, y, t)
    torch.testing.assert_close(energy, model(y, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fast_matches_autograd_float32(kind, backend):
    model32 = MODELS[kind](dtype=torch.float32)
    model64 = MODELS[kind](dtype=torch.float64)
    y, t = batch(model64)
    _, div = de.ExactDivergence()(de.score_fn(model64), y, t)
    _, fdiv = de.FastDivergence()(de.score_fn(model32), y.float(), t.float())
    assert fdiv.dtype == torch.float32
    assert max_rel(fdiv.double(), div) <= 1e-4


def test_shipped_model(backend):
    # the float32 all-atom model computes in float32 whatever the dtype of y (as forward does)
    model = de.load_model(os.path.join(ROOT, "models", "ala2_aa.pt"))
    y, t = batch(model, b=3)
    y = 0.5 * y
    _, div = de.ExactDivergence()(de.score_fn(model.double()), y, t)
    model = model.float()
    value, fdiv = de.FastDivergence()(de.score_fn(model), y, t)
    assert fdiv.dtype == torch.float64 and value.shape == y.shape
    assert max_rel(fdiv, div) <= 1e-4


def test_unknown_prior_term_takes_the_torch_func_route(monkeypatch):
    # a prior whose energy the analytic rule does not reproduce is differentiated generically
    model = molecule_prior()
    known = model.prior.forward
    monkeypatch.setattr(model.prior, "forward",
                        lambda y, t: known(y, t) + 0.05 * (y ** 4).sum(-1) * t)
    y, t = batch(model)
    assert laplacian._prior_jet(model.prior, y, t, None) is None
    _, div = de.ExactDivergence()(de.score_fn(model), y, t)
    _, fdiv = de.FastDivergence()(de.score_fn(model), y, t)
    assert max_rel(fdiv, div) <= 1e-6


def test_baseline_laplacian_is_analytic():
    # with the read-out zeroed the energy is the centroid-projected Gaussian |y_c|^2 / (2 v),
    # whose Laplacian on R^{3N} is 3 (N - 1) / v
    model = molecule()
    with torch.no_grad():
        model.linears[-1].weight.zero_()
        model.linears[-1].bias.zero_()
    y, t = batch(model)
    _, div = de.FastDivergence()(de.score_fn(model), y, t)
    v = model.sde.alpha(t) ** 2 + model.sde.sigma2(t)
    torch.testing.assert_close(div, -3 * (model.n_particles - 1) / v, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fused_hutchinson_equals_vjp_hutchinson(kind, backend):
    model = MODELS[kind]()
    y, t = batch(model)
    fn = de.score_fn(model)
    ref_value, ref = de.HutchinsonDivergence(3, seed=4)(fn, y, t)
    value, div = de.FusedHutchinsonDivergence(3, seed=4)(fn, y, t)
    torch.testing.assert_close(div, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(value, ref_value)


def test_fused_hutchinson_falls_back_for_any_model():
    gm = de.particle_mixture(4, 2, seed=5)
    y = gm.sample(3, torch.Generator().manual_seed(1)).reshape(3, -1)
    t = torch.full((3,), 0.3, dtype=torch.float64)
    fn = de.score_fn(gm)
    _, ref = de.HutchinsonDivergence(2, seed=1)(fn, y, t)
    _, div = de.get_estimator("fast-hutchinson", n_probes=2, seed=1)(fn, y, t)
    torch.testing.assert_close(div, ref)


def test_fast_rejects_models_without_a_rule():
    gm = de.mixture_2d()
    y = torch.zeros(2, 2, dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="forward-Laplacian rule"):
        de.FastDivergence()(de.score_fn(gm), y, t)
    with pytest.raises(ValueError, match="without a model"):
        de.FastDivergence()(lambda yy, tt: -yy, y, t)
    with pytest.raises(ValueError, match="forward-Laplacian rule"):
        de.nll(gm, None, y, divergence="fast", steps=2)
    assert isinstance(de.get_estimator("fast"), de.FastDivergence)


@pytest.mark.parametrize("path", ["flow", "diffusion"])
def test_nll_fast_equals_exact(path):
    model = molecule(n=5)
    x = 0.5 * batch(model, b=3)[0].reshape(3, 5, 3)
    exact = de.nll(model, None, x, path=path, divergence="exact", steps=4, seed=0)
    fast = de.nll(model, None, x, path=path, divergence="fast", steps=4, seed=0)
    torch.testing.assert_close(fast.nll, exact.nll, rtol=1e-9, atol=1e-9)
    assert fast.method["estimator"] == "fast"


def test_reweighting_sampler_takes_fast():
    # exact log q of i.i.d. flow samples, as importance weights need: fast equals exact
    from openmm_diffenergy.reweighting import sample_with_likelihood
    model = molecule(n=4)
    kw = {"n": 3, "solver": "rk4", "steps": 3, "seed": 0, "dtype": torch.float64}
    exact = sample_with_likelihood(model, divergence="exact", **kw)
    fast = sample_with_likelihood(model, divergence="fast", **kw)
    torch.testing.assert_close(fast.x, exact.x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.nll, exact.nll, rtol=1e-10, atol=1e-10)


# ---- the operators themselves -------------------------------------------------------

def layer_args(dtype=torch.float64, b=4, c=7, h_in=5, h_out=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    return r(b, h_in), r(b, c, h_in), r(b, h_in), r(h_out, h_in), r(h_out)


def sparse_args(dtype=torch.float64, b=4, f=6, n_cols=5, h=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    # entries in unsorted column order, one repeated (feature 2, column 1 twice)
    feat = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    coord = torch.tensor([4, 1, 0, 1, 3, 1, 2, 4, 0, 3])

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    return (r(b, f), r(b, feat.shape[0]), feat, coord, r(b, f), r(h, f), r(h), n_cols)


def torsion_args(dtype=torch.float64, b=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    quads = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4], [5, 0, 1, 2], [2, 3, 4, 5]])
    return torch.randn(b, n, 3, generator=g, dtype=dtype), quads, 1e-3, 0.1


@pytest.mark.parametrize("soft", [0.0, 0.1])
def test_torsion_jet_torch_against_torch_func(soft):
    # the plain-torch torsion jet: values of the model's own formula, torch.func derivatives
    from openmm_diffenergy.models.molecule import _torsion_cos_sin
    p, quads, eps, _ = torsion_args()
    value, jac, lap = ops.torsion_jet_torch(p, quads, eps, soft)
    c, s = _torsion_cos_sin(p, quads, eps, soft)
    torch.testing.assert_close(value, torch.stack([c, s], 1))
    one = torch.arange(4)[None]

    def cos_sin(q):
        c, s = _torsion_cos_sin(q.reshape(1, 4, 3), one, eps, soft)
        return torch.cat([c[0], s[0]])
    local = p[:, quads].reshape(-1, 12)
    want_jac = torch.func.vmap(torch.func.jacrev(cos_sin))(local)             # (B Q, 2, 12)
    want_lap = torch.func.vmap(torch.func.hessian(cos_sin))(local).diagonal(
        dim1=-2, dim2=-1).sum(-1)
    B, Q = p.shape[0], quads.shape[0]
    torch.testing.assert_close(jac, want_jac.reshape(B, Q, 2, 12).transpose(1, 2))
    torch.testing.assert_close(lap, want_lap.reshape(B, Q, 2).transpose(1, 2))


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("isa", ["auto", "default"])
def test_ops_equal_torch_rule(dtype, isa, monkeypatch):
    if isa == "default":
        monkeypatch.setenv("DIFFENERGY_CPU_ISA", "default")
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12,
                                                                       "atol": 1e-12}
    args = layer_args(dtype)
    for got, want in zip(torch.ops.diffenergy.linear_silu_laplacian(*args),
                         ops.linear_silu_laplacian_torch(*args)):
        torch.testing.assert_close(got, want, **tol)
    sargs = sparse_args(dtype)
    for got, want in zip(torch.ops.diffenergy.sparse_linear_silu_laplacian(*sargs),
                         ops.sparse_linear_silu_laplacian_torch(*sargs)):
        torch.testing.assert_close(got, want, **tol)
    targs = torsion_args(dtype)
    for got, want in zip(torch.ops.diffenergy.torsion_jet(*targs), ops.torsion_jet_torch(*targs)):
        torch.testing.assert_close(got, want, **tol)


def test_torch_rule_is_the_chain_rule():
    # the plain-torch rule against torch.func on a small layer: J' = d a / d u, L' = sum of
    # second derivatives, with h, J, L those of a known function of u
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 3, generator=g, dtype=torch.float64)
    W = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    u = torch.randn(3, generator=g, dtype=torch.float64)

    def inner(uu):
        return torch.tanh(A @ uu)

    def outer(uu):
        return torch.nn.functional.silu(W @ inner(uu) + b)
    h = inner(u)[None]
    J = torch.func.jacrev(inner)(u).T[None]                              # (1, C, H_in)
    L = torch.func.hessian(inner)(u).diagonal(dim1=-2, dim2=-1).sum(-1)[None]
    h2, J2, L2 = ops.linear_silu_laplacian_torch(h, J, L, W, b)
    torch.testing.assert_close(h2[0], outer(u))
    torch.testing.assert_close(J2[0], torch.func.jacrev(outer)(u).T)
    torch.testing.assert_close(
        L2[0], torch.func.hessian(outer)(u).diagonal(dim1=-2, dim2=-1).sum(-1))


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    torch.library.opcheck(torch.ops.diffenergy.linear_silu_laplacian.default,
                          layer_args(dtype))
    torch.library.opcheck(torch.ops.diffenergy.sparse_linear_silu_laplacian.default,
                          sparse_args(dtype))
    torch.library.opcheck(torch.ops.diffenergy.torsion_jet.default, torsion_args(dtype))


@needs_ops
def test_ops_check_their_inputs():
    h, J, L, W, b = layer_args()
    with pytest.raises(RuntimeError, match="J must have shape"):
        torch.ops.diffenergy.linear_silu_laplacian(h, J[:, :, :-1], L, W, b)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.diffenergy.linear_silu_laplacian(h, J, L, W.float(), b)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.diffenergy.linear_silu_laplacian(h.long(), J.long(), L.long(), W.long(),
                                                   b.long())
    args = list(sparse_args())
    args[3] = args[3] + 10                       # coordinates beyond n_cols
    with pytest.raises(RuntimeError, match="coord entries"):
        torch.ops.diffenergy.sparse_linear_silu_laplacian(*args)
    args = list(sparse_args())
    args[2] = args[2].int()
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.diffenergy.sparse_linear_silu_laplacian(*args)
    p, quads, eps, soft = torsion_args()
    with pytest.raises(RuntimeError, match="quads entries"):
        torch.ops.diffenergy.torsion_jet(p, quads + 6, eps, soft)
    with pytest.raises(RuntimeError, match=r"shape \(B, N, 3\)"):
        torch.ops.diffenergy.torsion_jet(p[..., :2], quads, eps, soft)


@needs_ops
def test_ops_refuse_to_differentiate():
    # no silent wrong gradients through the compiled path; the fallback differentiates
    model = molecule()
    y, t = batch(model)
    _, div = de.FastDivergence()(de.score_fn(model), y, t)
    assert div.requires_grad
    with pytest.raises(RuntimeError, match="no derivative"):
        div.sum().backward()
    with ops.torch_fallback():
        _, div = de.FastDivergence()(de.score_fn(model), y, t)
        div.sum().backward()
    assert model.linears[0].weight.grad is not None


@needs_ops
def test_ops_from_torchscript():
    @torch.jit.script
    def two_layers(h, vals, feat, coord, L, W0, b0, W1, b1, n_cols: int):
        h, J, L = torch.ops.diffenergy.sparse_linear_silu_laplacian(h, vals, feat, coord, L,
                                                                     W0, b0, n_cols)
        return torch.ops.diffenergy.linear_silu_laplacian(h, J, L, W1, b1)

    args = sparse_args()
    W1 = torch.randn(3, args[5].shape[0], dtype=torch.float64)
    b1 = torch.randn(3, dtype=torch.float64)
    got = two_layers(*args[:7], W1, b1, args[7])
    h, J, L = ops.sparse_linear_silu_laplacian_torch(*args)
    want = ops.linear_silu_laplacian_torch(h, J, L, W1, b1)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)
    assert "diffenergy::linear_silu_laplacian" in str(two_layers.graph)


def test_fallback_warns_once_when_the_library_is_absent():
    code = ("import warnings, torch\n"
            "warnings.simplefilter('always')\n"
            "import openmm_diffenergy as de\n"
            "from openmm_diffenergy import ops\n"
            "assert not ops.available()\n"
            "m = de.DistanceMLPEnergy(4, seed=0).double()\n"
            "y = torch.randn(3, 12, dtype=torch.float64)\n"
            "t = torch.full((3,), 0.5, dtype=torch.float64)\n"
            "fn = de.score_fn(m)\n"
            "_, a = de.FastDivergence()(fn, y, t)\n"
            "_, b = de.FastDivergence()(fn, y, t)\n"
            "_, c = de.ExactDivergence()(fn, y, t)\n"
            "assert ((a - c).abs() / c.abs()).max() < 1e-10\n"
            "print('ok')\n")
    env = dict(os.environ, DIFFENERGY_OPS_LIBRARY=os.path.join(ROOT, "no-such-library.so"))
    env.pop("DIFFENERGY_DISABLE_OPS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    lines = [ln for ln in out.stderr.splitlines() if "C++ operators unavailable" in ln]
    assert len(lines) == 1, out.stderr


# ---- CUDA (skipped where there is no GPU) ----------------------------------------------

@needs_cuda
@needs_ops
def test_ops_cuda_equal_cpu():
    assert ops.cuda_available(), "the library was built without CUDA kernels"
    for op, args in ((torch.ops.diffenergy.linear_silu_laplacian, layer_args()),
                     (torch.ops.diffenergy.sparse_linear_silu_laplacian, sparse_args()),
                     (torch.ops.diffenergy.torsion_jet, torsion_args())):
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        for got, want in zip(op(*cuda_args), op(*args)):
            assert got.is_cuda
            torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
        torch.library.opcheck(op.default, cuda_args)


@needs_cuda
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fast_cuda_matches_autograd(kind, backend):
    model = MODELS[kind]().cuda()
    y, t = (a.cuda() for a in batch(model))
    fn = de.score_fn(model)
    _, div = de.ExactDivergence()(fn, y, t)
    value, fdiv = de.FastDivergence()(fn, y, t)
    assert fdiv.is_cuda
    assert max_rel(fdiv, div) <= 1e-6
