"""OpenMM-ML integration: ``MLPotential('diffenergy', modelPath=...)``.

The learned force built through OpenMM-ML must give ``kT * E(x, t_min)`` (kJ/mol) on
exactly the atoms OpenMM-ML hands it, alone (``createSystem``) and beside a classical
force field (``createMixedSystem``), and refuse models for another molecule.
"""
import os

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

import openmm_diffenergy as de
from openmm_diffenergy.alanine import alanine_system, build_alanine_dipeptide

from _helpers import ROOT

openmmml = pytest.importorskip("openmmml")
MLPotential = openmmml.MLPotential

AA_MODEL = os.path.join(ROOT, "models", "ala2_aa.pt")
CG_MODEL = os.path.join(ROOT, "models", "ala2_cg.pt")


def _energies(system, positions, groups=None):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(positions)
    kw = {} if groups is None else {"groups": groups}
    state = ctx.getState(getEnergy=True, **kw)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def _learned_kj(x_nm, temperature=300.0):
    model = de.load_model(AA_MODEL)
    x = torch.tensor(np.asarray(x_nm), dtype=torch.float32)[None]
    return de.kt_kj_per_mol(temperature) * model.energy(x, model.t_min).item()


@pytest.fixture(scope="module")
def ala2():
    return build_alanine_dipeptide(phi=-80.0, psi=150.0)


def test_entry_point_registers_diffenergy():
    assert "diffenergy" in MLPotential._implFactories


def test_create_system_is_kt_times_energy(ala2):
    topology, pos = ala2
    system = MLPotential("diffenergy", modelPath=AA_MODEL).createSystem(topology)
    assert system.getNumParticles() == 22
    assert _energies(system, pos) == pytest.approx(_learned_kj(pos), rel=1e-5)
    # temperature given per call overrides the model's 300 K: kT doubles at 600 K
    hot = MLPotential("diffenergy", modelPath=AA_MODEL).createSystem(
        topology, temperature=600 * unit.kelvin)
    assert _energies(hot, pos) == pytest.approx(2 * _learned_kj(pos), rel=1e-5)


def test_create_mixed_system_acts_on_the_ml_atoms(ala2):
    # two alanine dipeptides 1.5 nm apart; the first is the ML region
    topology, pos = ala2
    modeller = app.Modeller(topology, pos * unit.nanometer)
    modeller.add(topology, (pos + [1.5, 0.0, 0.0]) * unit.nanometer)
    both = modeller.getTopology()
    xyz = np.array(modeller.getPositions().value_in_unit(unit.nanometer))
    mm = alanine_system(both, constraints=None)
    potential = MLPotential("diffenergy", modelPath=AA_MODEL)
    mixed = potential.createMixedSystem(both, mm, range(22), forceGroup=5)
    assert _energies(mixed, xyz, {5}) == pytest.approx(_learned_kj(xyz[:22]), rel=1e-5)
    # mechanical embedding: what is left is amber minus the first molecule's internal terms
    mm_rest = _energies(mixed, xyz) - _energies(mixed, xyz, {5})
    first_internal = _energies(alanine_system(topology, constraints=None), xyz[:22])
    assert mm_rest == pytest.approx(_energies(mm, xyz) - first_internal, abs=1e-4)


def test_wrong_molecule_and_options_are_refused(ala2):
    topology, pos = ala2
    with pytest.raises(ValueError, match="model for 5 particles, but the Topology has 22"):
        MLPotential("diffenergy", modelPath=CG_MODEL).createSystem(topology)
    mm = alanine_system(topology, constraints=None)
    with pytest.raises(ValueError, match=r"22 particles, but the ML region has \d+ atoms"):
        MLPotential("diffenergy", modelPath=AA_MODEL).createMixedSystem(
            topology, mm, range(10))
    with pytest.raises(ValueError, match="modelPath"):
        MLPotential("diffenergy")
    with pytest.raises(ValueError, match="unknown option"):
        MLPotential("diffenergy", modelPath=AA_MODEL, temprature=300)
    with pytest.raises(FileNotFoundError):
        MLPotential("diffenergy", modelPath=os.path.join(ROOT, "models", "missing.pt"))
