"""Divergence estimators: exact against an autograd oracle, Hutchinson against exact."""
import pytest
import torch

import openmm_diffenergy as de


def hessian_trace_loop(model, y, t):
    """Oracle: the autograd loop over dimensions (what DiffEnergy and TBG do)."""
    out = []
    for i in range(y.shape[0]):
        h = torch.autograd.functional.hessian(lambda z: model(z[None], t[i:i + 1])[0], y[i])
        out.append(-h.trace())
    return torch.stack(out)


@pytest.mark.parametrize("name", ["2d", "particles"])
def test_exact_matches_hessian_loop(name):
    gm = de.mixture_2d() if name == "2d" else de.particle_mixture(5, 2, seed=1)
    x = gm.sample(6, torch.Generator().manual_seed(0))
    y = x.reshape(6, -1)
    t = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    value, div = de.ExactDivergence()(de.score_fn(gm), y, t)
    torch.testing.assert_close(div, hessian_trace_loop(gm, y, t), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(value, de.score(gm, x, t).reshape(6, -1))
    # chunking over dimensions changes nothing
    _, div2 = de.ExactDivergence(chunk=4)(de.score_fn(gm), y, t)
    torch.testing.assert_close(div2, div, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    # Average over 4000 probes: the mean of v^T J v must match the exact trace within
    # 4 standard errors of the probe average (computed from the probes themselves).
    gm = de.particle_mixture(4, 2, seed=5)
    x = gm.sample(3, torch.Generator().manual_seed(1))
    y = x.reshape(3, -1)
    t = torch.full((3,), 0.2, dtype=torch.float64)
    _, exact = de.ExactDivergence()(de.score_fn(gm), y, t)
    est = de.HutchinsonDivergence(n_probes=4000, distribution=probe, seed=3)
    v = est.probes(y)
    fn = de.score_fn(gm)
    value, vjp = torch.func.vjp(lambda yy: fn(yy, t), y)
    quad = (torch.func.vmap(vjp)(v)[0] * v).sum(-1)      # (K, B)
    _, div = est(fn, y, t)
    torch.testing.assert_close(div, quad.mean(0))
    se = quad.std(0) / 4000 ** 0.5
    assert ((div - exact).abs() < 4 * se).all(), (div, exact, se)


def test_hutchinson_probes_fixed_until_reset():
    est = de.HutchinsonDivergence(2, seed=0)
    y = torch.zeros(5, 3, dtype=torch.float64)
    p1 = est.probes(y).clone()
    assert torch.equal(est.probes(y), p1)
    assert set(p1.unique().tolist()) <= {-1.0, 1.0}
    est.reset()
    assert not torch.equal(est.probes(y), p1)
    # same seed, same probes
    assert torch.equal(de.HutchinsonDivergence(2, seed=0).probes(y), p1)


def test_rademacher_single_probe_is_exact_in_1d():
    gm = de.mixture_1d()
    y = torch.linspace(-2, 2, 7, dtype=torch.float64)[:, None]
    t = torch.full((7,), 0.1, dtype=torch.float64)
    _, exact = de.ExactDivergence()(de.score_fn(gm), y, t)
    _, hut = de.HutchinsonDivergence(1, seed=1)(de.score_fn(gm), y, t)
    torch.testing.assert_close(hut, exact)


def test_estimator_arguments():
    assert isinstance(de.get_estimator("exact"), de.ExactDivergence)
    assert de.get_estimator("hutchinson", n_probes=3).n_probes == 3
    with pytest.raises(ValueError, match="unknown divergence"):
        de.get_estimator("laplace")
    with pytest.raises(ValueError, match="n_probes"):
        de.HutchinsonDivergence(0)
    with pytest.raises(ValueError, match="distribution"):
        de.HutchinsonDivergence(1, distribution="uniform")
