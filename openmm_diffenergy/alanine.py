"""Alanine dipeptide (ACE-ALA-NME) built from internal coordinates, and its amber14 System.

Nothing is downloaded: the ten heavy atoms are placed from standard bond lengths, angles
and dihedrals (natural extension reference frame), OpenMM's ``Modeller`` adds the
hydrogens, and amber14 parameterizes the molecule in vacuum or OBC2 implicit solvent.
"""
from __future__ import annotations

import math

import numpy as np
from openmm import app, unit

__all__ = ["build_alanine_dipeptide", "alanine_system", "is_l_chiral", "PHI_ATOMS", "PSI_ATOMS"]

# atom names (residue, name) of the backbone dihedrals
PHI_ATOMS = (("ACE", "C"), ("ALA", "N"), ("ALA", "CA"), ("ALA", "C"))
PSI_ATOMS = (("ALA", "N"), ("ALA", "CA"), ("ALA", "C"), ("NME", "N"))


def _place(a, b, c, bond, angle, torsion):
    """Position of d with |cd| = bond, angle bcd and dihedral abcd (degrees, nm)."""
    angle, torsion = math.radians(angle), math.radians(torsion)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = np.array([-bond * math.cos(angle), bond * math.sin(angle) * math.cos(torsion),
                   bond * math.sin(angle) * math.sin(torsion)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def build_alanine_dipeptide(phi: float = -70.0, psi: float = 140.0, forcefield=None):
    """Build ACE-ALA-NME with all 22 atoms.

    Parameters
    ----------
    phi, psi : float
        Backbone dihedrals in degrees.
    forcefield : openmm.app.ForceField, optional
        Used by ``Modeller.addHydrogens``; amber14 by default.

    Returns
    -------
    topology : openmm.app.Topology
    positions : numpy.ndarray, shape (22, 3), nm
    """
    ca_ = 0.1  # angstrom to nm
    p = {}
    p["ACE", "CH3"] = np.zeros(3)
    p["ACE", "C"] = np.array([1.52 * ca_, 0.0, 0.0])
    seed = np.array([0.0, 1.0 * ca_, 0.0])
    p["ALA", "N"] = _place(seed, p["ACE", "CH3"], p["ACE", "C"], 1.33 * ca_, 116.6, 180.0)
    p["ALA", "CA"] = _place(p["ACE", "CH3"], p["ACE", "C"], p["ALA", "N"], 1.46 * ca_, 121.7,
                            180.0)
    p["ALA", "C"] = _place(p["ACE", "C"], p["ALA", "N"], p["ALA", "CA"], 1.52 * ca_, 111.2, phi)
    p["NME", "N"] = _place(p["ALA", "N"], p["ALA", "CA"], p["ALA", "C"], 1.33 * ca_, 116.2, psi)
    p["NME", "C"] = _place(p["ALA", "CA"], p["ALA", "C"], p["NME", "N"], 1.46 * ca_, 121.7,
                           180.0)
    p["ACE", "O"] = _place(p["ALA", "CA"], p["ALA", "N"], p["ACE", "C"], 1.23 * ca_, 122.5, 0.0)
    p["ALA", "O"] = _place(p["NME", "C"], p["NME", "N"], p["ALA", "C"], 1.23 * ca_, 122.5, 0.0)
    # L-alanine: the improper C-N-CA-CB is about -122.5 degrees
    p["ALA", "CB"] = _place(p["ALA", "C"], p["ALA", "N"], p["ALA", "CA"], 1.53 * ca_, 110.5,
                            -122.5)

    top = app.Topology()
    chain = top.addChain()
    atoms = {}
    positions = []
    layout = {"ACE": ["CH3", "C", "O"], "ALA": ["N", "CA", "CB", "C", "O"], "NME": ["N", "C"]}
    for resname, names in layout.items():
        res = top.addResidue(resname, chain)
        for name in names:
            atoms[resname, name] = top.addAtom(name, app.Element.getBySymbol(name[0]), res)
            positions.append(p[resname, name])
    top.createStandardBonds()
    forcefield = forcefield or app.ForceField("amber14-all.xml")
    modeller = app.Modeller(top, np.array(positions) * unit.nanometer)
    modeller.addHydrogens(forcefield)
    pos = np.array(modeller.getPositions().value_in_unit(unit.nanometer))
    return modeller.getTopology(), pos


def alanine_system(topology, solvent: str = "vacuum", constraints=app.HBonds):
    """amber14 System for alanine dipeptide.

    Parameters
    ----------
    topology : openmm.app.Topology
    solvent : {"vacuum", "obc2"}
    constraints : openmm.app constraint type or None
    """
    files = {"vacuum": ["amber14-all.xml"], "obc2": ["amber14-all.xml", "implicit/obc2.xml"]}
    if solvent not in files:
        raise ValueError(f"solvent must be 'vacuum' or 'obc2', got {solvent!r}")
    ff = app.ForceField(*files[solvent])
    return ff.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=constraints)


def _index(topology, resname, name):
    for atom in topology.atoms():
        if atom.residue.name == resname and atom.name == name:
            return atom.index
    raise ValueError(f"no atom {resname}:{name}")


def is_l_chiral(topology, xyz) -> np.ndarray:
    """L-chirality of the alanine CA: ``((C - CA) x (CB - CA)) . (N - CA) > 0``.

    Parameters
    ----------
    topology : openmm.app.Topology or mdtraj.Topology
    xyz : array-like, shape (F, n_atoms, 3) or (n_atoms, 3)

    Returns
    -------
    numpy.ndarray of bool, shape (F,)
    """
    top = topology.to_openmm() if hasattr(topology, "to_openmm") else topology
    xyz = np.asarray(xyz).reshape(-1, top.getNumAtoms(), 3)
    n, ca, cb, c = (xyz[:, _index(top, "ALA", name)] for name in ("N", "CA", "CB", "C"))
    return np.einsum("fi,fi->f", np.cross(c - ca, cb - ca), n - ca) > 0
