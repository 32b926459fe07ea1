"""Systems for learned forces: coarse-grained bead systems and replica batching.

- :class:`CoarseGraining` maps an all-atom mdtraj Topology to beads (one atom per bead
  from a selection, or atom groups placed at their centres of mass) and builds the
  bead ``openmm.System`` and an ``openmm.app.Topology`` that PDB/DCD reporters can write.
- :func:`replicate_system` makes one System of ``n`` non-interacting copies, so a learned
  force with ``n_replicas=n`` evaluates all copies in one batched call per step;
  :func:`split_replicas` splits the trajectory back per replica.
"""
from __future__ import annotations

import copy

import numpy as np
import openmm
from openmm import app, unit

__all__ = ["CoarseGraining", "replicate_system", "split_replicas"]


class CoarseGraining:
    """Atoms-to-beads mapping for an mdtraj Topology.

    Parameters
    ----------
    topology : mdtraj.Topology
    mapping : str or sequence of sequences of int
        An mdtraj selection string (each selected atom is a bead, e.g. ``"name CA"`` or
        ``"not element H"``), or explicit bead groups of atom indices, each bead placed
        at the centre of mass of its group.

    Attributes
    ----------
    groups : list of numpy.ndarray
        Atom indices of each bead.
    masses : numpy.ndarray, shape (n_beads,)
        Bead masses in dalton (sums of atom masses).
    """

    def __init__(self, topology, mapping):
        self.atom_topology = topology
        if isinstance(mapping, str):
            try:
                sel = topology.select(mapping)
            except Exception as err:
                raise ValueError(f"bad atom selection {mapping!r}: {err}") from None
            groups = [np.array([i]) for i in sel]
        else:
            groups = [np.asarray(g, dtype=int).reshape(-1) for g in mapping]
        if not groups:
            raise ValueError(f"the mapping {mapping!r} selects no atoms")
        n_atoms = topology.n_atoms
        for k, g in enumerate(groups):
            if g.size == 0 or (g < 0).any() or (g >= n_atoms).any():
                raise ValueError(f"bead {k} has an empty group or an atom index outside "
                                 f"0..{n_atoms - 1}")
        self.groups = groups
        atom_mass = np.array([a.element.mass if a.element is not None else 0.0
                              for a in topology.atoms])
        self.masses = np.array([atom_mass[g].sum() for g in groups])
        if (self.masses <= 0).any():
            raise ValueError("every bead needs a positive mass (atoms without elements?)")
        self._weights = np.zeros((len(groups), n_atoms))
        for k, g in enumerate(groups):
            self._weights[k, g] = atom_mass[g] / atom_mass[g].sum()

    @property
    def n_beads(self) -> int:
        return len(self.groups)

    def map_positions(self, xyz) -> np.ndarray:
        """Bead positions (nm) from atom positions.

        Parameters
        ----------
        xyz : array-like, shape (F, n_atoms, 3) or (n_atoms, 3), or mdtraj.Trajectory

        Returns
        -------
        numpy.ndarray, shape (F, n_beads, 3) (or (n_beads, 3) for one frame)
        """
        xyz = getattr(xyz, "xyz", xyz)
        xyz = np.asarray(xyz, dtype=float)
        if xyz.shape[-2:] != (self.atom_topology.n_atoms, 3):
            raise ValueError(f"positions of shape {xyz.shape}; expected (..., "
                             f"{self.atom_topology.n_atoms}, 3)")
        return np.einsum("ka,...ac->...kc", self._weights, xyz)

    def map_forces(self, forces) -> np.ndarray:
        """Bead forces from atom forces: the sum over each bead's group.

        For non-overlapping groups this is a valid force map (Noid et al. 2008): its
        conditional mean given the bead positions is the mean force, so mapped forces
        over ``kT`` serve as data scores for target score matching.

        Parameters
        ----------
        forces : array-like, shape (F, n_atoms, 3) or (n_atoms, 3)
            Any force unit; the result has the same.

        Returns
        -------
        numpy.ndarray, shape (F, n_beads, 3) (or (n_beads, 3) for one frame)

        Raises
        ------
        ValueError
            If the shape is wrong or the groups share atoms.
        """
        forces = np.asarray(forces, dtype=float)
        if forces.shape[-2:] != (self.atom_topology.n_atoms, 3):
            raise ValueError(f"forces of shape {forces.shape}; expected (..., "
                             f"{self.atom_topology.n_atoms}, 3)")
        members = np.concatenate(self.groups)
        if len(np.unique(members)) != len(members):
            raise ValueError("bead groups share atoms; summed forces are not a valid force "
                             "map for overlapping groups")
        return np.einsum("ka,...ac->...kc", (self._weights > 0).astype(float), forces)

    def create_system(self) -> openmm.System:
        """An ``openmm.System`` of the beads with their masses and no forces."""
        system = openmm.System()
        for m in self.masses:
            system.addParticle(float(m) * unit.dalton)
        return system

    @property
    def topology(self) -> app.Topology:
        """Bead topology: one bead per atom named after its (first) atom, in its residue."""
        top = app.Topology()
        atoms = list(self.atom_topology.atoms)
        chains, residues = {}, {}
        for k, g in enumerate(self.groups):
            first = atoms[int(g[0])]
            res = first.residue
            chain_key = res.chain.index
            if chain_key not in chains:
                chains[chain_key] = top.addChain()
            if res.index not in residues:
                residues[res.index] = top.addResidue(res.name, chains[chain_key],
                                                     str(res.resSeq))
            if g.size == 1:
                element = app.Element.getBySymbol(first.element.symbol) \
                    if first.element is not None else None
                top.addAtom(first.name, element, residues[res.index])
            else:
                top.addAtom(f"B{k}", None, residues[res.index])
        return top


_COPYABLE = ("HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce",
             "CustomBondForce", "CustomAngleForce", "CustomTorsionForce", "CMMotionRemover")


def replicate_system(system: openmm.System, n_replicas: int, topology: app.Topology | None = None):
    """One System holding ``n_replicas`` non-interacting copies of ``system``.

    Particles of replica ``r`` are ``r * N .. (r + 1) * N - 1``. Constraints and bonded
    forces (harmonic/periodic/custom bond, angle and torsion forces, CMMotionRemover)
    are copied per replica; add the learned force afterwards with
    ``create_force(..., n_replicas=n_replicas)``.

    Parameters
    ----------
    system : openmm.System
    n_replicas : int
    topology : openmm.app.Topology, optional
        Replicated too (each replica's chains follow the previous replica's).

    Returns
    -------
    openmm.System, or (openmm.System, openmm.app.Topology) if ``topology`` is given.

    Raises
    ------
    ValueError
        For a force that cannot be replicated without coupling the copies (for example
        a NonbondedForce).
    """
    if int(n_replicas) != n_replicas or n_replicas < 1:
        raise ValueError(f"n_replicas must be a positive integer, got {n_replicas}")
    n = system.getNumParticles()
    out = openmm.System()
    for _ in range(n_replicas):
        for i in range(n):
            out.addParticle(system.getParticleMass(i))
        base = out.getNumParticles() - n
        for c in range(system.getNumConstraints()):
            i, j, d = system.getConstraintParameters(c)
            out.addConstraint(base + i, base + j, d)
    for force in system.getForces():
        kind = type(force).__name__
        if kind not in _COPYABLE:
            raise ValueError(f"cannot replicate a {kind}: only {', '.join(_COPYABLE)} are "
                             "copied; add interacting or learned forces after replicating")
        out.addForce(_replicate_force(force, n, n_replicas))
    if topology is None:
        return out
    top = app.Topology()
    for _ in range(n_replicas):
        amap = {}
        for chain in topology.chains():
            c = top.addChain(chain.id)
            for res in chain.residues():
                r = top.addResidue(res.name, c, res.id, res.insertionCode)
                for atom in res.atoms():
                    amap[atom] = top.addAtom(atom.name, atom.element, r, atom.id)
        for a, b in topology.bonds():
            top.addBond(amap[a], amap[b])
    return out, top


def _replicate_force(force, n, n_replicas):
    if isinstance(force, openmm.CMMotionRemover):
        return copy.deepcopy(force)
    new = copy.deepcopy(force)
    if isinstance(force, openmm.HarmonicBondForce):
        terms, get, add, width = force.getNumBonds(), force.getBondParameters, new.addBond, 2
    elif isinstance(force, openmm.HarmonicAngleForce):
        terms, get, add, width = force.getNumAngles(), force.getAngleParameters, new.addAngle, 3
    elif isinstance(force, openmm.PeriodicTorsionForce):
        terms, get, add, width = (force.getNumTorsions(), force.getTorsionParameters,
                                  new.addTorsion, 4)
    elif isinstance(force, openmm.CustomBondForce):
        terms, get, add, width = force.getNumBonds(), force.getBondParameters, new.addBond, 2
    elif isinstance(force, openmm.CustomAngleForce):
        terms, get, add, width = force.getNumAngles(), force.getAngleParameters, new.addAngle, 3
    else:
        terms, get, add, width = (force.getNumTorsions(), force.getTorsionParameters,
                                  new.addTorsion, 4)
    for r in range(1, n_replicas):
        for k in range(terms):
            params = list(get(k))
            atoms = [a + r * n for a in params[:width]]
            add(*atoms, *params[width:])
    return new


def split_replicas(x, n_replicas: int):
    """Split a replica trajectory into one trajectory per replica.

    Parameters
    ----------
    x : numpy.ndarray of shape (F, n_replicas * N, 3), or mdtraj.Trajectory
    n_replicas : int

    Returns
    -------
    numpy.ndarray of shape (n_replicas, F, N, 3), or a list of mdtraj.Trajectory
    """
    if hasattr(x, "atom_slice"):
        n = x.n_atoms // n_replicas
        if n * n_replicas != x.n_atoms:
            raise ValueError(f"{x.n_atoms} atoms do not split into {n_replicas} replicas")
        return [x.atom_slice(range(r * n, (r + 1) * n)) for r in range(n_replicas)]
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[2] != 3 or x.shape[1] % n_replicas:
        raise ValueError(f"positions of shape {x.shape} do not split into {n_replicas} "
                         "replicas; expected (F, n_replicas * N, 3)")
    f, total, _ = x.shape
    return x.reshape(f, n_replicas, total // n_replicas, 3).transpose(1, 0, 2, 3)
