"""Shared by the tests: the repository root, a loader for scripts outside the package and
a bonded pair as an OpenMM System."""
import importlib.util
import os

import openmm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(relpath):
    """Import a script of the repository (examples/, benchmarks/, scripts/) as a module."""
    path = os.path.join(ROOT, relpath)
    spec = importlib.util.spec_from_file_location(os.path.basename(relpath)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bonded_pair(k: float) -> openmm.System:
    """Two particles (12 amu) joined by a zero-length harmonic bond, ``k`` in kJ/mol/nm^2:
    each axis of ``x1 - x0`` is Gaussian with variance ``kT / k``."""
    system = openmm.System()
    for _ in range(2):
        system.addParticle(12.0)
    bond = openmm.HarmonicBondForce()
    bond.addBond(0, 1, 0.0, k)
    system.addForce(bond)
    return system
