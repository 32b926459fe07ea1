"""GaussianMixtureEnergy: exact diffused densities, scores, particle subspace, bad input."""
import math

import pytest
import torch

import openmm_diffenergy as de


def small_particle_mixture(length_scale=1.0, sde=None):
    return de.particle_mixture(n_particles=4, n_components=2, seed=3, sde=sde,
                               length_scale=length_scale)


@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("sde", [de.VPSDE(), de.VESDE(0.01, 5.0)], ids=repr)
def test_1d_energy_is_normalized(t, sde):
    gm = de.mixture_1d(sde)
    sd = math.sqrt(float(sde.sigma2(torch.tensor(t))) + 1.0)
    grid = torch.linspace(-12 * sd, 12 * sd, 40001, dtype=torch.float64)
    p = (-gm.energy(grid[:, None], t)).exp()
    assert abs(torch.trapezoid(p, grid).item() - 1.0) < 1e-7


def test_2d_energy_is_normalized():
    gm = de.mixture_2d()
    g = torch.linspace(-4, 4, 801, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    p = (-gm.energy(pts, 0.0)).exp().reshape(801, 801)
    total = torch.trapezoid(torch.trapezoid(p, g), g).item()
    assert abs(total - 1.0) < 1e-4   # grid spacing 0.01 against widths >= 0.06


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_diffused_density_matches_monte_carlo_convolution(t, gen):
    # p_t(x) = E_{x0 ~ p_0} N(x; alpha x0, sigma^2): estimate with 200000 exact draws.
    gm = de.mixture_2d()
    sde = gm.sde
    tt = torch.tensor(t, dtype=torch.float64)
    a, v = float(sde.alpha(tt)), float(sde.sigma2(tt))
    x0 = gm.sample(200000, gen)
    pts = torch.tensor([[0.0, 0.0], [0.8, 0.2], [-0.7, -0.6]], dtype=torch.float64)
    d2 = ((pts[:, None, :] - a * x0[None]) ** 2).sum(-1)
    mc = (torch.exp(-0.5 * d2 / v) / (2 * math.pi * v)).mean(1)
    exact = (-gm.energy(pts, t)).exp()
    torch.testing.assert_close(mc, exact, rtol=0.03, atol=0)


@pytest.mark.parametrize("model", ["1d", "2d", "particles"])
def test_score_matches_finite_differences(model):
    gm = {"1d": de.mixture_1d(), "2d": de.mixture_2d(),
          "particles": small_particle_mixture(length_scale=0.3)}[model]
    x = gm.sample(5, torch.Generator().manual_seed(2)) * 1.1
    t = torch.tensor([0.0, 0.01, 0.2, 0.6, 1.0], dtype=torch.float64)
    s = de.score(gm, x, t)
    assert s.shape == x.shape
    flat = x.reshape(5, -1)
    h = 1e-6
    fd = torch.zeros_like(flat)
    for i in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, i] = h
        fd[:, i] = -(gm.energy((flat + e).reshape(x.shape), t)
                     - gm.energy((flat - e).reshape(x.shape), t)) / (2 * h)
    # central differences: truncation O(h^2 E''') and round-off O(eps E / h) ~ 1e-9
    torch.testing.assert_close(s.reshape(5, -1), fd, rtol=1e-6, atol=1e-6)


def test_particle_energy_translation_and_rotation():
    gm = small_particle_mixture()
    x = gm.sample(3, torch.Generator().manual_seed(0))
    e = gm.energy(x, 0.2)
    torch.testing.assert_close(gm.energy(x + torch.tensor([1.0, -2.0, 0.5],
                                                           dtype=torch.float64), 0.2), e)
    s = de.score(gm, x, 0.2)
    torch.testing.assert_close(s.sum(1), torch.zeros(3, 3, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    assert gm.dof == 9 and gm.dim == 12


def test_length_scale_changes_density_by_jacobian():
    a = small_particle_mixture(length_scale=1.0)
    b = small_particle_mixture(length_scale=0.25)
    x = a.sample(4, torch.Generator().manual_seed(1))
    # b is a scaled copy of a: p_b(x / 4) = 4^D p_a(x)
    torch.testing.assert_close(b.log_prob(x * 0.25, 0.0), a.log_prob(x, 0.0) + 9 * math.log(4))
    torch.testing.assert_close(b.energy(x * 0.25, 0.3), a.energy(x, 0.3))


def test_samples_follow_the_mixture(gen):
    gm = de.mixture_1d()
    x = gm.sample(100000, gen)
    grid = torch.linspace(-4, 4, 8001, dtype=torch.float64)
    p = (-gm.energy(grid[:, None], 0.0)).exp()
    mean = torch.trapezoid(p * grid, grid).item()
    var = torch.trapezoid(p * grid ** 2, grid).item() - mean ** 2
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / 1e5)
    assert abs(mean) < 1e-10   # the reproduction mixture is centred


@pytest.mark.parametrize("bad, match", [
    (lambda: torch.zeros(3, 4, 2, dtype=torch.float64), "last dimension"),
    (lambda: torch.zeros(3, 5, 3, dtype=torch.float64), "5 particles but the model is for 4"),
    (lambda: torch.zeros(3, 7, dtype=torch.float64), r"expected \(B, 4, 3\) or \(B, 12\)"),
    (lambda: torch.full((2, 4, 3), float("nan"), dtype=torch.float64), "NaN"),
    (lambda: torch.zeros(4, 3, dtype=torch.float64), "expected"),
    (lambda: [[0.0] * 12], "torch.Tensor"),
    (lambda: torch.zeros(2, 12, dtype=torch.int64), "floating-point"),
])
def test_bad_positions_raise(bad, match):
    gm = small_particle_mixture()
    with pytest.raises(ValueError, match=match):
        gm.energy(bad(), 0.1)
    with pytest.raises(ValueError, match=match):
        de.score(gm, bad(), 0.1)


@pytest.mark.parametrize("t, match", [(1.5, r"\[0, 1\]"), (-0.1, r"\[0, 1\]"),
                                      (float("nan"), "NaN"), (float("inf"), "NaN or inf"),
                                      (torch.zeros(3, dtype=torch.float64), "shape")])
def test_bad_times_raise(t, match):
    gm = de.mixture_2d()
    with pytest.raises(ValueError, match=match):
        gm.energy(torch.zeros(2, 2, dtype=torch.float64), t)


def test_vector_model_rejects_wrong_dimension():
    with pytest.raises(ValueError, match=r"expected \(B, 2\)"):
        de.mixture_2d().energy(torch.zeros(5, 3, dtype=torch.float64), 0.0)


def test_bad_mixture_parameters():
    with pytest.raises(ValueError, match="positive definite"):
        de.GaussianMixtureEnergy([[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="symmetric"):
        de.GaussianMixtureEnergy([[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="weights"):
        de.GaussianMixtureEnergy([[0.0], [1.0]], [1.0, 1.0], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="covariances must have shape"):
        de.GaussianMixtureEnergy([[0.0], [1.0]], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"\(K, N, 3\)"):
        de.GaussianMixtureEnergy(torch.zeros(1, 4, 2), [1.0])
    with pytest.raises(ValueError, match="length_scale"):
        de.GaussianMixtureEnergy([[0.0]], [1.0], length_scale=-1.0)
