"""Training: DSM and FP terms against analytic answers, checkpoints and resume."""
import os

import numpy as np
import pytest
import torch

import openmm_diffenergy as de


def tiny_model(seed=0):
    return de.MoleculeEnergy(4, [(0, 1, 2, 3)], hidden=16, layers=2, length_scale=0.3,
                             seed=seed)


def tiny_data(n=64):
    g = torch.Generator().manual_seed(3)
    base = torch.tensor([[0.0, 0.0, 0.0], [0.15, 0.0, 0.0], [0.2, 0.14, 0.0],
                         [0.35, 0.15, 0.05]])
    return base + 0.01 * torch.randn(n, 4, 3, generator=g)


def test_fp_residual_vanishes_for_the_exact_mixture():
    # the exact diffused mixture satisfies the FPE with d_t log Z = 0: residual 0
    gm = de.particle_mixture(3, 2, seed=0)
    y = gm.sample(8, torch.Generator().manual_seed(1)).reshape(8, -1)
    for t in (0.05, 0.5, 0.9):
        r = de.fp_residual(gm, gm.sde, y, torch.full((8,), t, dtype=torch.float64),
                           probes=None)
        assert r.abs().max() < 1e-9
    model = tiny_model()
    r = de.fp_residual(model, model.sde, tiny_data(8).reshape(8, -1) / 0.3,
                       torch.full((8,), 0.5), probes=None)
    assert (r - r.mean()).abs().max() > 1e-3     # an untrained network violates it


def test_dsm_loss_is_minimal_for_the_exact_score():
    # DSM loss of the exact mixture vs the same mixture with wider covariances: the
    # exact one is lower (same noise draws; 4000 samples make the gap >> noise)
    gm = de.particle_mixture(3, 1, seed=2)
    cov = torch.tensor(gm.config()["covariances"])
    wrong = de.GaussianMixtureEnergy(gm.config()["means"], cov * 2.0)
    y0 = gm.sample(4000, torch.Generator().manual_seed(0)).reshape(4000, -1)
    t = torch.rand(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = de.dsm_loss(gm, gm.sde, y0, t, torch.Generator().manual_seed(5))
    b = de.dsm_loss(wrong, gm.sde, y0, t, torch.Generator().manual_seed(5))
    assert a < 0.97 * b   # measured 0.0828 vs 0.0882


def test_training_reduces_the_loss():
    model = tiny_model()
    out = de.train(model, tiny_data(), config=de.TrainConfig(
        steps=300, batch_size=32, lr=3e-3, checkpoint_every=1000), progress=False,
        log=lambda s: None)
    hist = out["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]


class _RunsCode:
    """Unpickling this object would call ``os.system``: what a hostile checkpoint does."""

    def __reduce__(self):
        import os
        return (os.system, ("echo unpickled > " + _RunsCode.marker,))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    marker = str(tmp_path / "ran")
    _RunsCode.marker = marker
    torch.save({"model": _RunsCode(), "step": 3}, ckpt)
    with pytest.raises(ValueError, match="refused the training checkpoint .*run.ckpt.*--fresh"):
        de.train(tiny_model(), tiny_data(), config=de.TrainConfig(steps=5, batch_size=8),
                 checkpoint=ckpt, progress=False, log=lambda s: None)
    assert not os.path.exists(marker)          # nothing was unpickled
    with open(ckpt, "wb") as fh:               # a truncated file: a clear error too
        fh.write(b"PK\x03\x04")
    with pytest.raises(ValueError, match="cannot read the training checkpoint"):
        de.train(tiny_model(), tiny_data(), config=de.TrainConfig(steps=5, batch_size=8),
                 checkpoint=ckpt, progress=False, log=lambda s: None)
    # what train() itself writes loads with weights_only=True
    good = str(tmp_path / "good.ckpt")
    de.train(tiny_model(), tiny_data(), config=de.TrainConfig(steps=4, batch_size=8,
                                                              checkpoint_every=2),
             checkpoint=good, progress=False, log=lambda s: None)
    state = torch.load(good, map_location="cpu", weights_only=True)
    assert state["format"] == "openmm_diffenergy.checkpoint" and state["step"] == 4


def test_checkpoint_resume_is_exact(tmp_path):
    cfg = dict(batch_size=16, lr=1e-3, checkpoint_every=10, fp_weight=0.01, fp_times=2)
    straight = tiny_model()
    de.train(straight, tiny_data(), config=de.TrainConfig(steps=20, **cfg), progress=False,
             log=lambda s: None)
    ckpt = str(tmp_path / "run.ckpt")

    def interrupt(line):      # the session ends at step 12; the checkpoint is at 10
        if line.startswith("step 12 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        de.train(tiny_model(), tiny_data(), config=de.TrainConfig(steps=20, **cfg),
                 checkpoint=ckpt, progress=False, log=interrupt)
    resumed = tiny_model()
    lines = []
    de.train(resumed, tiny_data(), config=de.TrainConfig(steps=20, **cfg), checkpoint=ckpt,
             progress=False, log=lines.append)
    assert any("resumed" in line for line in lines)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    # the saved model file round-trips with its metadata
    path = de.save_model(resumed, str(tmp_path / "m.pt"), kind="test")
    loaded = de.load_model(path, n_particles=4, model_class="MoleculeEnergy")
    x = tiny_data(5)
    torch.testing.assert_close(loaded.energy(x, 0.01), resumed.energy(x, 0.01))
    assert loaded.metadata["kind"] == "test" and loaded.metadata["length_scale_nm"] == 0.3


def test_molecule_energy_symmetries():
    model = tiny_model()
    x = tiny_data(6)
    e = model.energy(x, 0.1)
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    rot = rot * torch.sign(torch.det(rot))
    torch.testing.assert_close(model.energy(x @ rot.T + 0.7, 0.1), e, rtol=1e-5, atol=1e-5)
    mirror = x * torch.tensor([-1.0, 1.0, 1.0])
    assert (model.energy(mirror, 0.1) - e).abs().max() > 1e-4   # chirality-aware


def test_torsions_from_bonds():
    assert de.torsion_quadruples([(0, 1), (1, 2), (2, 3)], 4) == [(0, 1, 2, 3)]
    with pytest.raises(ValueError, match="bad torsion"):
        de.MoleculeEnergy(4, [(0, 1, 2, 9)])


def test_bad_training_data():
    with pytest.raises(ValueError, match="expected"):
        de.train(tiny_model(), torch.zeros(10, 5, 3), progress=False)
    bad = tiny_data()
    bad[3, 1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        de.train(tiny_model(), bad, progress=False)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from openmm_diffenergy.io import atomic_write
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), "w") as fh:
            fh.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    with atomic_write(str(path), "w") as fh:
        fh.write("new")
    assert path.read_text() == "new"


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    import os
    import stat

    from openmm_diffenergy.io import atomic_write
    umask = os.umask(0o022)
    try:
        path = tmp_path / "g.txt"
        with atomic_write(str(path), "w") as fh:
            fh.write("x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644   # not mkstemp's private 0o600
    finally:
        os.umask(umask)


def test_fp_times_and_scale(monkeypatch):
    # spy on the FP residual: the times stay in [t_eps, fp_t_max] and the logged penalty
    # is the within-time variance of sigma^2 r ("sigma2") or of r ("none")
    import openmm_diffenergy.training as tr

    seen = []

    def fake_residual(model, sde, y, t, generator=None):
        seen.append(t.detach().clone())
        return torch.arange(y.shape[0], dtype=y.dtype)

    monkeypatch.setattr(tr, "fp_residual", fake_residual)
    for scale in ("none", "sigma2"):
        seen.clear()
        lines = []
        cfg = de.TrainConfig(steps=1, batch_size=32, fp_weight=0.1, fp_times=2, fp_t_max=0.05,
                             fp_scale=scale, checkpoint_every=5)
        de.train(tiny_model(), tiny_data(), config=cfg, progress=False, log=lines.append)
        t = seen[0]
        assert t.shape == (8,) and t.min() >= cfg.t_eps and t.max() <= 0.05
        r = torch.arange(8.0).reshape(2, 4)
        if scale == "sigma2":
            r = r * tiny_model().sde.sigma2(t.reshape(2, 4))
        expected = ((r - r.mean(1, keepdim=True)) ** 2).mean()
        logged = float(lines[-1].split(" fp ")[1].split()[0])
        assert logged == pytest.approx(float(expected), abs=1e-4)
    for bad in (dict(fp_scale="sigma4"), dict(fp_t_max=1e-4), dict(fp_t_max=2.0)):
        with pytest.raises(ValueError, match="fp_"):
            de.train(tiny_model(), tiny_data(), config=de.TrainConfig(steps=1, **bad),
                     progress=False)


def test_net_t_floor_freezes_the_network_below_the_floor():
    # below the floor only the analytic Gaussian term depends on t; above it the model is
    # the one without a floor; the option survives a save/load and TorchScript
    floor = 0.02
    plain, floored = tiny_model(), de.MoleculeEnergy(
        4, [(0, 1, 2, 3)], hidden=16, layers=2, length_scale=0.3, seed=0, net_t_floor=floor)
    y = tiny_data(5).reshape(5, -1) / 0.3
    y = y - y.reshape(5, 4, 3).mean(1).repeat(1, 4)

    def net_part(model, t):
        tt = torch.full((5,), t)
        v = model.sde.alpha(tt) ** 2 + model.sde.sigma2(tt)
        return model(y, tt) - 0.5 * (y * y).sum(-1) / v

    torch.testing.assert_close(net_part(floored, 0.001), net_part(floored, 0.015))
    torch.testing.assert_close(net_part(floored, 0.001), net_part(plain, floor))
    assert (net_part(plain, 0.001) - net_part(plain, 0.015)).abs().max() > 1e-3
    torch.testing.assert_close(floored(y, torch.full((5,), 0.3)), plain(y, torch.full((5,), 0.3)))
    again = de.MoleculeEnergy.from_config(floored.config())
    again.load_state_dict(floored.state_dict())
    assert again.net_t_floor == floor
    traced = torch.jit.trace(floored, (y, torch.full((5,), 0.001)), check_trace=False)
    for t in (0.001, 0.3):     # the export traces the model: the clamp must stay an op
        torch.testing.assert_close(traced(y, torch.full((5,), t)), floored(y, torch.full((5,), t)))
    with pytest.raises(ValueError, match="net_t_floor"):
        de.MoleculeEnergy(4, [], net_t_floor=1.5)


def test_target_score_mixture_is_exact_for_a_gaussian():
    # data N(mu, v I): with P = 1/v the TSM/DSM target equals the true score for every
    # noise draw, so the exact model's loss vanishes where plain DSM's is of order one;
    # P -> inf gives DSM back, and the exact score still beats a wrong one at other P
    v, mu = 0.04, torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64)
    gm = de.GaussianMixtureEnergy(mu, torch.tensor([v], dtype=torch.float64))
    wrong = de.GaussianMixtureEnergy(mu, torch.tensor([2 * v], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    y0 = mu + v ** 0.5 * torch.randn(2000, 3, generator=g, dtype=torch.float64)
    g0 = -(y0 - mu) / v
    t = 1e-3 + (1 - 1e-3) * torch.rand(2000, generator=g, dtype=torch.float64)

    def loss(model, **kw):
        return float(de.dsm_loss(model, gm.sde, y0, t, torch.Generator().manual_seed(5),
                                **kw).detach())

    assert loss(gm, g0=g0, precision=1 / v) < 1e-20
    dsm = loss(gm)
    assert dsm > 0.05
    assert loss(gm, g0=g0, precision=1e12) == pytest.approx(dsm, rel=1e-6)
    assert loss(gm, g0=g0, precision=3.0) < loss(wrong, g0=g0, precision=3.0)


def test_train_with_scores_estimates_the_precision():
    # isotropic data of std 0.01 nm around a fixed shape: scores -(x - base) / 1e-4 nm^-2;
    # in model units (x 0.3 nm) the centred per-coordinate mean square is 0.09 * 3/4 * 1e4
    x = tiny_data(2000)
    base = tiny_data(1) * 0 + x.mean(0)
    scores = -(x - base) / 1e-4
    lines = []
    out = de.train(tiny_model(), x, config=de.TrainConfig(steps=2, batch_size=8),
                   progress=False, log=lines.append, scores=scores.numpy())   # array-like
    assert out["config"]["tsm_precision"] == pytest.approx(675, rel=0.12)
    assert any("precision P" in line for line in lines)
    with pytest.raises(ValueError, match="scores have shape"):
        de.train(tiny_model(), x, progress=False, scores=scores[:10])
    bad = scores.clone()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="scores hold NaN"):
        de.train(tiny_model(), x, progress=False, scores=bad)


def test_train_only_leaves_other_parameters_alone():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lines = []
    de.train(model, tiny_data(), config=de.TrainConfig(steps=5, batch_size=8, lr=1e-2,
                                                       train_only=["linears.1"]),
             progress=False, log=lines.append)
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == n.startswith("linears.1"), n
        assert p.requires_grad
    assert any("training only linears.1.weight, linears.1.bias" in line for line in lines)
    with pytest.raises(ValueError, match="matches no parameter"):
        de.train(tiny_model(), tiny_data(), config=de.TrainConfig(steps=1, train_only=["nope"]),
                 progress=False)


def test_train_only_restores_flags_when_training_fails():
    model = tiny_model()
    model.linears[0].bias.requires_grad_(False)          # the user's own freeze is kept

    def fail(line):
        if line.startswith("step"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        de.train(model, tiny_data(), config=de.TrainConfig(
            steps=50, batch_size=8, checkpoint_every=5, train_only=["linears.1"]),
            progress=False, log=fail)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags.pop("linears.0.bias") is False
    assert all(flags.values())
