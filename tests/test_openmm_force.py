"""The learned energy as an OpenMM force: forces, sampling, serialization, selections."""
import os
import sys

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from scipy import stats

import openmm_diffenergy as de

PLATFORMS = ["Reference", "CPU"]
BACKENDS = [("torchforce", True), ("torchforce", False), ("pythonforce", True)]
KT = de.kt_kj_per_mol(300.0)


def bare_system(n, mass=12.0):
    system = openmm.System()
    for _ in range(n):
        system.addParticle(mass)
    return system


def context(system, platform, integrator=None):
    integrator = integrator or openmm.VerletIntegrator(0.001)
    return openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))


def state(ctx, group=de.openmm_force.LEARNED_FORCE_GROUP):
    st = ctx.getState(getEnergy=True, getForces=True, groups={group})
    return (st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


@pytest.fixture(scope="module")
def gm5():
    return de.particle_mixture(5, 2, seed=1, length_scale=0.3)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("backend, outputs_forces", BACKENDS)
def test_forces_are_kt_times_score(gm5, platform, backend, outputs_forces):
    x = gm5.sample(3, torch.Generator().manual_seed(4))
    system = bare_system(5)
    de.add_learned_force(system, gm5, backend=backend, outputs_forces=outputs_forces,
                         temperature=300 * unit.kelvin)
    ctx = context(system, platform)
    # Reference keeps double precision end to end; CPU stores positions in single
    tol = 1e-5 if platform == "Reference" else 1e-4
    for xi in x:
        ctx.setPositions(xi.numpy())
        energy, forces = state(ctx)
        xs = torch.tensor(ctx.getState(getPositions=True).getPositions(asNumpy=True)
                          .value_in_unit(unit.nanometer))[None]
        ref_f = (KT * de.score(gm5, xs, 0.0))[0].numpy()
        ref_e = KT * gm5.energy(xs, 0.0).item()
        assert np.abs(forces - ref_f).max() <= tol * np.abs(ref_f).max()
        assert abs(energy - ref_e) <= tol * max(1.0, abs(ref_e))


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_float32_network_forces(backend):
    model = de.DistanceMLPEnergy(6, hidden=32, seed=0, length_scale=0.5)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)) * 0.4
    system = bare_system(6)
    de.add_learned_force(system, model, backend=backend)
    ctx = context(system, "Reference")
    ctx.setPositions(x.double().numpy())
    energy, forces = state(ctx)
    ref = (KT * de.score(model, x[None], model.t_min))[0].double().numpy()
    assert np.abs(forces - ref).max() <= 1e-4 * np.abs(ref).max()
    assert abs(energy - KT * model.energy(x[None], model.t_min).item()) < 1e-4 * KT


def gaussian_pair(var=0.01, sep=0.3):
    """Two particles whose separation r = x0 - x1 is N((sep, 0, 0), 2 var I)."""
    means = torch.tensor([[[sep / 2, 0.0, 0.0], [-sep / 2, 0.0, 0.0]]], dtype=torch.float64)
    return de.GaussianMixtureEnergy(means, [var])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_langevin_samples_the_boltzmann_distribution(backend):
    # 32 replicas of a particle pair with U = kT E: the separation along x must be
    # N(0.3, 0.02) nm^2 exactly. Frames every 0.5 ps (twice the position correlation
    # time 1/(gamma) * kT / (m omega^2) ~ 0.24 ps), 60 frames x 32 replicas = 1920
    # nearly independent draws; KS test at p > 1e-3.
    n_rep, var, sep = 32, 0.01, 0.3
    model = gaussian_pair(var, sep)
    system = de.replicate_system(bare_system(2), n_rep)
    de.add_learned_force(system, model, backend=backend, n_replicas=n_rep)
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 10 / unit.picosecond,
                                            0.002 * unit.picoseconds)
    integ.setRandomNumberSeed(2024)
    ctx = context(system, "CPU", integ)
    x0 = model.sample(n_rep, torch.Generator().manual_seed(0)).reshape(-1, 3)
    ctx.setPositions(x0.numpy())
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    integ.step(500)
    frames = []
    for _ in range(60):
        integ.step(250)
        frames.append(ctx.getState(getPositions=True).getPositions(asNumpy=True)
                      .value_in_unit(unit.nanometer))
    per_rep = de.split_replicas(np.array(frames), n_rep)        # (R, F, 2, 3)
    r = (per_rep[:, :, 0] - per_rep[:, :, 1]).reshape(-1, 3)
    for axis, mean in ((0, sep), (1, 0.0)):
        p = stats.kstest(r[:, axis], "norm", args=(mean, np.sqrt(2 * var))).pvalue
        assert p > 1e-3, (axis, p, r[:, axis].mean(), r[:, axis].var())


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_serialization_round_trip(gm5, backend):
    # A classical force before and after the learned one: order and groups survive.
    system = bare_system(5)
    bond = openmm.HarmonicBondForce()
    bond.addBond(0, 1, 0.1, 100.0)
    system.addForce(bond)
    de.add_learned_force(system, gm5, backend=backend, force_group=4)
    system.addForce(openmm.CMMotionRemover())
    x = gm5.sample(1, torch.Generator().manual_seed(2))[0].numpy()
    xml = de.serialize_system(system)
    if backend == "pythonforce":
        # the pickled computation reads back through OpenMM itself
        assert openmm.XmlSerializer.deserialize(xml).getNumForces() == 3
    copy = de.deserialize_system(xml)
    assert [type(copy.getForce(i)).__name__ for i in range(3)][0::2] == \
        ["HarmonicBondForce", "CMMotionRemover"]
    assert copy.getForce(1).getForceGroup() == 4
    out = []
    for s in (system, copy):
        ctx = context(s, "Reference")
        ctx.setPositions(x)
        out.append(state(ctx, group=4))
        out.append(state(ctx, group=0))
    for a, b in ((out[0], out[2]), (out[1], out[3])):
        assert a[0] == pytest.approx(b[0], rel=1e-12)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-12)
    assert out[0][0] != 0.0 and out[1][0] != 0.0


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_particle_subset_beside_classical_forces(gm5, backend):
    # 9 particles: the learned term acts on 5 of them in a scrambled order; a harmonic
    # bond between two others lives in group 0 and is read separately.
    sel = [7, 2, 5, 0, 3]
    system = bare_system(9)
    bond = openmm.HarmonicBondForce()
    bond.addBond(1, 4, 0.2, 1000.0)
    system.addForce(bond)
    de.add_learned_force(system, gm5, particles=sel, backend=backend)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3)) * 0.3
    x[sel] = gm5.sample(1, torch.Generator().manual_seed(5))[0].numpy()
    ctx = context(system, "Reference")
    ctx.setPositions(x)
    energy, forces = state(ctx)
    xs = torch.tensor(x[sel])[None]
    assert energy == pytest.approx(KT * gm5.energy(xs, 0.0).item(), rel=1e-10)
    np.testing.assert_allclose(forces[sel], (KT * de.score(gm5, xs, 0.0))[0].numpy(),
                               rtol=1e-8, atol=1e-8)
    others = [i for i in range(9) if i not in sel]
    assert np.abs(forces[others]).max() == 0.0
    e_bond = ctx.getState(getEnergy=True, groups={0}).getPotentialEnergy()
    d = np.linalg.norm(x[1] - x[4])
    assert e_bond.value_in_unit(unit.kilojoule_per_mole) == pytest.approx(
        0.5 * 1000 * (d - 0.2) ** 2, rel=1e-10)
    assert de.learned_energy(ctx).value_in_unit(unit.kilojoule_per_mole) == pytest.approx(energy)


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_replicas_in_one_batched_call(gm5, backend):
    n_rep = 4
    base = bare_system(5)
    bond = openmm.HarmonicBondForce()
    bond.addBond(0, 1, 0.15, 500.0)
    base.addForce(bond)
    base.addConstraint(2, 3, 0.1)
    system = de.replicate_system(base, n_rep)
    assert system.getNumParticles() == 20 and system.getNumConstraints() == 4
    de.add_learned_force(system, gm5, n_replicas=n_rep, backend=backend)
    x = gm5.sample(n_rep, torch.Generator().manual_seed(9))
    ctx = context(system, "Reference")
    ctx.setPositions(x.reshape(-1, 3).numpy())
    energy, forces = state(ctx)
    assert energy == pytest.approx(KT * gm5.energy(x, 0.0).sum().item(), rel=1e-10)
    np.testing.assert_allclose(forces.reshape(n_rep, 5, 3),
                               (KT * de.score(gm5, x, 0.0)).numpy(), rtol=1e-8, atol=1e-8)
    e_bonds = ctx.getState(getEnergy=True, groups={0}).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)
    d = np.linalg.norm((x[:, 0] - x[:, 1]).numpy(), axis=-1)
    assert e_bonds == pytest.approx((0.5 * 500 * (d - 0.15) ** 2).sum(), rel=1e-10)
    split = de.split_replicas(x.reshape(1, -1, 3).numpy(), n_rep)
    assert split.shape == (n_rep, 1, 5, 3)
    np.testing.assert_array_equal(split[2, 0], x[2].numpy())


def test_replicate_rejects_coupling_forces():
    system = bare_system(2)
    system.addForce(openmm.NonbondedForce())
    with pytest.raises(ValueError, match="NonbondedForce"):
        de.replicate_system(system, 2)


@pytest.fixture(scope="module")
def villin():
    path = os.path.join(os.path.dirname(app.__file__), "data", "test.pdb")
    return mdtraj.load(path)


def test_coarse_grained_system_and_md(villin, tmp_path):
    cg = de.CoarseGraining(villin.topology, "name CA")
    n = cg.n_beads
    assert n == villin.topology.select("name CA").size
    assert np.allclose(cg.masses, 12.011, atol=0.01)
    beads = cg.map_positions(villin)[0]
    np.testing.assert_allclose(beads, villin.xyz[0, villin.topology.select("name CA")],
                               atol=1e-6)
    # residue groups at their centres of mass
    groups = [[a.index for a in r.atoms] for r in villin.topology.residues]
    cg_res = de.CoarseGraining(villin.topology, groups)
    m = np.array([a.element.mass for a in villin.topology.atoms])
    g0 = np.array(groups[0])
    np.testing.assert_allclose(cg_res.map_positions(villin.xyz[0])[0],
                               (villin.xyz[0, g0] * m[g0, None]).sum(0) / m[g0].sum(),
                               rtol=1e-6)
    assert cg_res.masses[0] == pytest.approx(m[g0].sum())
    # forces map by summing over groups; a selection keeps the selected atoms' forces
    f = np.random.default_rng(1).normal(size=(2, villin.n_atoms, 3))
    np.testing.assert_allclose(cg_res.map_forces(f)[:, 0], f[:, g0].sum(1))
    np.testing.assert_allclose(cg.map_forces(f), f[:, villin.topology.select("name CA")])
    with pytest.raises(ValueError, match="share atoms"):
        de.CoarseGraining(villin.topology, [[0, 1], [1, 2]]).map_forces(f)
    # CG MD with a learned force (a random network), written by standard reporters
    system = cg.create_system()
    model = de.DistanceMLPEnergy(n, hidden=16, seed=0, length_scale=1.0)
    de.add_learned_force(system, model)
    harm = openmm.CustomBondForce("0.5*k*(r-r0)^2")
    harm.addPerBondParameter("r0")
    harm.addGlobalParameter("k", 5000.0)
    for i in range(n - 1):
        harm.addBond(i, i + 1, [float(np.linalg.norm(beads[i + 1] - beads[i]))])
    system.addForce(harm)
    integ = openmm.LangevinMiddleIntegrator(300, 1, 0.002)
    sim = app.Simulation(cg.topology, system, integ, openmm.Platform.getPlatformByName("CPU"))
    sim.context.setPositions(beads)
    sim.reporters.append(app.DCDReporter(str(tmp_path / "cg.dcd"), 10))
    sim.step(50)
    with open(tmp_path / "cg.pdb", "w") as fh:
        app.PDBFile.writeFile(cg.topology, sim.context.getState(getPositions=True)
                              .getPositions(), fh)
    traj = mdtraj.load(str(tmp_path / "cg.dcd"), top=str(tmp_path / "cg.pdb"))
    assert traj.n_frames == 5 and traj.n_atoms == n
    assert np.isfinite(traj.xyz).all()


def test_bad_mapping(villin):
    with pytest.raises(ValueError, match="selects no atoms"):
        de.CoarseGraining(villin.topology, "name XYZ")
    with pytest.raises(ValueError, match="outside"):
        de.CoarseGraining(villin.topology, [[0, 10 ** 6]])


def test_model_files(gm5, tmp_path):
    path = de.save_model(gm5, str(tmp_path / "gm.pt"), masses=[12.0] * 5, temperature=300.0)
    force = de.create_force(path)
    assert force.getForceGroup() == 1 and force.getName() == "DiffEnergy"
    with pytest.raises(FileNotFoundError, match="not found"):
        de.create_force(str(tmp_path / "missing.pt"))
    data = open(path, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        de.create_force(str(tmp_path / "cut.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an openmm_diffenergy model"):
        de.load_model(str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="for 5 particles, but 7"):
        de.load_model(path, n_particles=7)
    with pytest.raises(ValueError, match="holds a GaussianMixtureEnergy"):
        de.load_model(path, model_class="DistanceMLPEnergy")
    system = bare_system(6)
    with pytest.raises(ValueError, match="6 particles but the model acts on 5"):
        de.add_learned_force(system, path)
    heavy = bare_system(5, mass=14.0)
    with pytest.raises(ValueError, match="masses"):
        de.add_learned_force(heavy, path, masses=True)


@pytest.mark.parametrize("backend", ["torchforce", "pythonforce"])
def test_nan_positions_raise(gm5, backend):
    system = bare_system(5)
    de.add_learned_force(system, gm5, backend=backend)
    ctx = context(system, "Reference")
    x = np.zeros((5, 3))
    x[2, 1] = np.nan
    ctx.setPositions(x)
    with pytest.raises(Exception, match="NaN"):
        ctx.getState(getEnergy=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -5.0}, "temperature"),
    ({"temperature": 300 * unit.nanometer}, "compatible"),
    ({"backend": "jax"}, "backend"),
    ({"particles": [0, 1, 2]}, "3 indices"),
    ({"particles": [0, 1, 2, 3, 3]}, "distinct"),
    ({"n_replicas": 0}, "n_replicas"),
    ({"t_min": 2.0}, "t_min"),
    ({"force_group": 40}, "force_group"),
])
def test_bad_force_arguments(gm5, kwargs, match):
    with pytest.raises(ValueError, match=match):
        de.create_force(gm5, **kwargs)


def test_vector_models_are_refused():
    with pytest.raises(ValueError, match="particle model"):
        de.create_force(de.mixture_2d())


def test_clear_error_when_openmmtorch_cannot_load(gm5, monkeypatch):
    monkeypatch.setitem(sys.modules, "openmmtorch", None)
    with pytest.raises(ImportError, match="backend='pythonforce'"):
        de.create_force(gm5, backend="torchforce")
    assert isinstance(de.create_force(gm5, backend="pythonforce"), openmm.PythonForce)
