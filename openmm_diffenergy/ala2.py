"""Alanine-dipeptide reference data and particle selections for the shipped models."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Reference", "load_reference", "selection", "CG_BACKBONE", "phi_psi"]

# the 5-bead coarse-grained backbone: C(ACE) N CA C N(NME)
CG_BACKBONE = (("ACE", "C"), ("ALA", "N"), ("ALA", "CA"), ("ALA", "C"), ("NME", "N"))


@dataclass
class Reference:
    """Reference MD of alanine dipeptide.

    Attributes
    ----------
    xyz : numpy.ndarray, shape (F, 22, 3), nm
    topology : mdtraj.Topology
    masses : numpy.ndarray, shape (22,), dalton
    atom_names : list of str, "RES:NAME"
    settings : dict
    """

    xyz: np.ndarray
    topology: object
    masses: np.ndarray
    atom_names: list
    settings: dict


def load_reference(path: str) -> Reference:
    """Load the ``.npz`` written by ``scripts/generate_ala2_data.py``."""
    import mdtraj
    from openmm import app

    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference data not found: {path} (make it with "
                                "scripts/generate_ala2_data.py)")
    data = np.load(path)
    pdb = app.PDBFile(io.StringIO(str(data["topology_pdb"])))
    top = mdtraj.Topology.from_openmm(pdb.topology)
    masses = np.array([a.element.mass for a in top.atoms])
    names = [f"{a.residue.name}:{a.name}" for a in top.atoms]
    return Reference(data["xyz"], top, masses, names, json.loads(str(data["settings"])))


def _find(top, resname, name):
    for a in top.atoms:
        if a.residue.name == resname and a.name == name:
            return a.index
    raise ValueError(f"no atom {resname}:{name}")


def selection(topology, kind: str):
    """Atom indices and torsion features of a shipped model.

    Parameters
    ----------
    topology : mdtraj.Topology
    kind : {"aa", "cg"}
        ``"aa"``: all 22 atoms, every proper torsion of the bond graph. ``"cg"``: the 5
        backbone beads (C N CA C N) with phi and psi.

    Returns
    -------
    indices : list of int
    torsions : list of (int, int, int, int), indices into the selection
    """
    from .models.molecule import torsion_quadruples

    if kind == "aa":
        bonds = [(b[0].index, b[1].index) for b in topology.bonds]
        return list(range(topology.n_atoms)), torsion_quadruples(bonds, topology.n_atoms)
    if kind == "cg":
        return [_find(topology, r, n) for r, n in CG_BACKBONE], [(0, 1, 2, 3), (1, 2, 3, 4)]
    raise ValueError(f"kind must be 'aa' or 'cg', got {kind!r}")


def phi_psi(xyz, topology, kind: str = "aa") -> np.ndarray:
    """Backbone dihedrals in radians, shape (F, 2), from all-atom or CG positions.

    Uses mdtraj's definitions (phi: C(ACE)-N-CA-C, psi: N-CA-C-N(NME)).
    """
    import mdtraj

    xyz = np.asarray(xyz).reshape(-1, np.shape(xyz)[-2], 3)
    if kind == "aa":
        traj = mdtraj.Trajectory(xyz, topology)
        return np.stack([mdtraj.compute_phi(traj)[1][:, 0], mdtraj.compute_psi(traj)[1][:, 0]], 1)
    quads = np.array([[0, 1, 2, 3], [1, 2, 3, 4]])
    traj = mdtraj.Trajectory(xyz, None)
    return mdtraj.compute_dihedrals(traj, quads, periodic=False)
