"""A System holding the learned force survives every standard OpenMM operation.

Plain ``openmm.XmlSerializer`` round trips, ``copy.deepcopy``, ``Context`` checkpoints,
``app.Simulation`` state files and a ``CustomCVForce`` around the learned force (the
``lambda_learned`` scale) must all give the energies and forces of the original System.
Energies agree to 1e-6 relative (the issue's bound); the module is the same bytes after a
round trip, so in practice they agree to rounding.
"""
import copy

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

import openmm_diffenergy as de

BACKENDS = ["torchforce", "pythonforce"]
KT = de.kt_kj_per_mol(300.0)
REL = 1e-6


@pytest.fixture(scope="module")
def gm5():
    return de.particle_mixture(5, 2, seed=1, length_scale=0.3)


def _system(gm5, backend, layout):
    """The learned force on all particles, on a scrambled subset, or on 3 replicas."""
    if layout == "all":
        n, kwargs, sel = 5, {}, list(range(5))
    elif layout == "subset":
        sel = [7, 2, 5, 0, 3]
        n, kwargs = 9, {"particles": sel}
    else:
        n, kwargs, sel = 15, {"n_replicas": 3}, list(range(15))
    system = openmm.System()
    for _ in range(n):
        system.addParticle(12.0)
    bond = openmm.HarmonicBondForce()
    bond.addBond(0, 1, 0.1, 100.0)
    system.addForce(bond)
    de.add_learned_force(system, gm5, backend=backend, **kwargs)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 3)) * 0.3
    x[sel] = gm5.sample(len(sel) // 5, torch.Generator().manual_seed(5)).reshape(-1, 3).numpy()
    return system, x


def _energy_forces(system, x, group=None):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x)
    kw = {} if group is None else {"groups": {group}}
    st = ctx.getState(getEnergy=True, getForces=True, **kw)
    return (st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def _assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=REL)
    np.testing.assert_allclose(a[1], b[1], rtol=REL, atol=REL * np.abs(a[1]).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["all", "subset", "replicas"])
def test_plain_xml_serializer_round_trip(gm5, backend, layout):
    system, x = _system(gm5, backend, layout)
    xml = openmm.XmlSerializer.serialize(system)
    back = openmm.XmlSerializer.deserialize(xml)
    assert back.getNumForces() == system.getNumForces()
    assert back.getForce(1).getForceGroup() == de.LEARNED_FORCE_GROUP
    learned = _energy_forces(system, x, de.LEARNED_FORCE_GROUP)
    assert learned[0] != 0.0
    _assert_same(_energy_forces(back, x, de.LEARNED_FORCE_GROUP), learned)
    _assert_same(_energy_forces(back, x), _energy_forces(system, x))
    # and the package's own reader gives the same System
    _assert_same(_energy_forces(de.deserialize_system(xml), x), _energy_forces(system, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_of_force_and_system(gm5, backend):
    system, x = _system(gm5, backend, "subset")
    force_copy = copy.deepcopy(system.getForce(1))
    assert type(force_copy).__name__ == type(system.getForce(1)).__name__
    other = openmm.System()
    for i in range(system.getNumParticles()):
        other.addParticle(system.getParticleMass(i))
    other.addForce(force_copy)
    ref = _energy_forces(system, x, de.LEARNED_FORCE_GROUP)
    _assert_same(_energy_forces(other, x, de.LEARNED_FORCE_GROUP), ref)
    _assert_same(_energy_forces(copy.deepcopy(system), x), _energy_forces(system, x))


def _langevin(system, x, platform="Reference"):
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond,
                                            0.001 * unit.picosecond)
    integ.setRandomNumberSeed(11)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(x)
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, 11)
    return ctx, integ


def _positions(ctx):
    return ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(
        unit.nanometer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_checkpoint_round_trip(gm5, backend):
    # A checkpoint restores positions, velocities and the integrator's random state, so
    # the continued trajectory is the same bit for bit.
    system, x = _system(gm5, backend, "replicas")
    ctx, integ = _langevin(system, x)
    integ.step(20)
    saved = ctx.createCheckpoint()
    integ.step(30)
    first = _positions(ctx)
    ctx.loadCheckpoint(saved)
    integ.step(30)
    np.testing.assert_array_equal(_positions(ctx), first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_simulation_save_and_load_state(gm5, backend, tmp_path):
    system, x = _system(gm5, backend, "all")
    top = app.Topology()
    chain = top.addChain()
    for i in range(5):
        top.addAtom(f"C{i}", app.Element.getBySymbol("C"), top.addResidue("MOL", chain))
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond,
                                            0.001 * unit.picosecond)
    sim = app.Simulation(top, system, integ, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(x)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 3)
    sim.step(10)
    path = str(tmp_path / "state.xml")
    sim.saveState(path)
    before = sim.context.getState(getEnergy=True, getPositions=True)
    sim.step(10)
    sim.loadState(path)
    after = sim.context.getState(getEnergy=True, getPositions=True)
    np.testing.assert_allclose(after.getPositions(asNumpy=True)._value,
                               before.getPositions(asNumpy=True)._value, rtol=0, atol=1e-12)
    assert after.getPotentialEnergy()._value == pytest.approx(
        before.getPotentialEnergy()._value, rel=1e-12)
    # a Simulation built from the XML of the System continues from the same state file
    back = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    sim2 = app.Simulation(top, back, openmm.LangevinMiddleIntegrator(
        300 * unit.kelvin, 1.0 / unit.picosecond, 0.001 * unit.picosecond),
        openmm.Platform.getPlatformByName("Reference"))
    sim2.loadState(path)
    e2 = sim2.context.getState(getEnergy=True).getPotentialEnergy()._value
    assert e2 == pytest.approx(before.getPotentialEnergy()._value, rel=REL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_learned_scales_the_learned_energy(gm5, backend):
    # One Context, one parameter: every lambda gives lambda * U of the unscaled force,
    # equal to a System built per state (the force at temperature lambda * T).
    base, x = _system(gm5, backend, "subset")
    n = base.getNumParticles()
    scaled = openmm.System()
    for i in range(n):
        scaled.addParticle(base.getParticleMass(i))
    de.add_learned_force(scaled, gm5, particles=[7, 2, 5, 0, 3], backend=backend,
                         scale_parameter=de.LEARNED_SCALE, scale=0.25)
    force = scaled.getForce(0)
    assert isinstance(force, openmm.CustomCVForce)
    assert force.getGlobalParameterName(0) == "lambda_learned"
    assert force.getForceGroup() == de.LEARNED_FORCE_GROUP
    ctx = openmm.Context(scaled, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x)
    assert ctx.getParameter("lambda_learned") == 0.25
    for lam in (0.0, 0.25, 0.6, 1.0):
        ctx.setParameter("lambda_learned", lam)
        st = ctx.getState(getEnergy=True, getForces=True)
        got = (st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
               st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
        per_state = openmm.System()
        for i in range(n):
            per_state.addParticle(12.0)
        if lam > 0:
            de.add_learned_force(per_state, gm5, particles=[7, 2, 5, 0, 3], backend=backend,
                                 temperature=300.0 * lam)
            _assert_same(got, _energy_forces(per_state, x))
        else:
            assert got[0] == 0.0 and np.abs(got[1]).max() == 0.0
    # the scaled force survives the plain XML round trip with its parameter
    back = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(scaled))
    assert back.getForce(0).getGlobalParameterDefaultValue(0) == 0.25
    _assert_same(_energy_forces(back, x), _energy_forces(scaled, x))


def test_scaled_force_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one force"):
        de.scaled_force([], "lam", {"lam": 1.0})
    with pytest.raises(ValueError, match="not a valid global parameter"):
        de.scaled_force([openmm.HarmonicBondForce()], "x", {"bad name": 1.0})


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_scan_in_one_context_equals_per_state_systems(gm5, backend):
    # lambda_free_energy's mixed Context: U = (1 - l) U_learned + l U_classical with one
    # parameter, against a System built for each state from unscaled forces.
    from openmm_diffenergy.reweighting import LAMBDA_STATE, _hamiltonian_force

    classical = openmm.System()
    for _ in range(5):
        classical.addParticle(12.0)
    bond = openmm.HarmonicBondForce()
    for i in range(4):
        bond.addBond(i, i + 1, 0.15, 300.0)
    classical.addForce(bond)
    classical.addForce(openmm.CMMotionRemover())
    mixed = openmm.System()
    for _ in range(5):
        mixed.addParticle(12.0)
    mixed.addForce(_hamiltonian_force(gm5, f"1 - {LAMBDA_STATE}", 300.0, backend))
    mixed.addForce(_hamiltonian_force(classical, LAMBDA_STATE, 300.0, backend))
    ctx = openmm.Context(mixed, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    x = gm5.sample(1, torch.Generator().manual_seed(8))[0].numpy()
    ctx.setPositions(x)
    learned = _energy_forces(_system(gm5, backend, "all")[0], x, de.LEARNED_FORCE_GROUP)
    amber_like = _energy_forces(classical, x)
    for lam in (0.0, 0.3, 1.0):
        ctx.setParameter(LAMBDA_STATE, lam)
        st = ctx.getState(getEnergy=True, getForces=True)
        got = (st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
               st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
        per_state = openmm.System()
        for _ in range(5):
            per_state.addParticle(12.0)
        if lam < 1.0:
            de.add_learned_force(per_state, gm5, backend=backend, temperature=300.0 * (1 - lam))
        if lam > 0.0:
            per_state.addForce(de.scaled_force([openmm.XmlSerializer.clone(bond)], str(lam), {}))
        _assert_same(got, _energy_forces(per_state, x))
        expected = (1 - lam) * learned[0] + lam * amber_like[0]
        assert got[0] == pytest.approx(expected, rel=REL)


def test_serializer_abi_check(monkeypatch):
    from openmm_diffenergy import openmm_force

    assert not openmm_force.serializer_abi_mismatch()     # the pinned stack is safe
    monkeypatch.setattr(openmm.version, "short_version", "8.6.1")
    monkeypatch.setattr(openmm_force, "_ABI_WARNED", False)
    assert openmm_force.serializer_abi_mismatch()
    with pytest.warns(RuntimeWarning, match="openmm==8.5.2"):
        openmm_force._warn_serializer_abi()


def test_openmmtorch_import_prints_no_simtk_warning():
    # openmmtorch's SWIG wrapper imports simtk.openmm, whose shim logs a deprecation
    # warning on the root logger; the package filters that one message at the import.
    import subprocess
    import sys

    code = ("import logging, openmm_diffenergy as de\n"
            "logging.basicConfig()\n"
            "de.openmm_force.load_openmmtorch()\n"
            "logging.getLogger().warning('other warnings still print')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "simtk" not in done.stderr + done.stdout
    assert "other warnings still print" in done.stderr
