"""OpenMM-ML integration: ``MLPotential('diffenergy', modelPath=...)``.

The package declares an ``openmmml.potentials`` entry point named ``diffenergy``, so with
``openmmml`` installed (1.7 is pinned) a learned energy is used like any other ML
potential::

    from openmmml import MLPotential
    potential = MLPotential("diffenergy", modelPath="models/ala2_aa.pt")
    system = potential.createSystem(topology)                       # learned energy only
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms)  # learned ML region

The learned force is ``U = kT E_theta(x / s, t_min)`` in kJ/mol
(:func:`openmm_diffenergy.create_force`). The model acts on exactly the atoms OpenMM-ML
hands it: all atoms of the Topology for ``createSystem``, the ML subset for
``createMixedSystem``; their number must equal the model's particle count, and where the
model records the masses it was trained with (dalton), they must match the System's.

Options (keyword arguments of ``MLPotential(...)``, overridable per call of
``createSystem`` / ``createMixedSystem``):

- ``modelPath`` (required): a model file written by :func:`openmm_diffenergy.save_model`.
- ``temperature``: of ``kT``, kelvin or an ``openmm.unit`` quantity; default the
  model's training temperature (metadata), else 300 K.
- ``tMin``: diffusion time at which the energy is read; default the model's ``t_min``.
- ``backend``: ``"torchforce"`` (default) or ``"pythonforce"``.
- ``checkMasses``: compare the System's masses with the model's (default True).
"""
from __future__ import annotations

__all__ = ["DiffEnergyPotentialImplFactory", "DiffEnergyPotentialImpl"]

try:  # openmmml is optional: without it the classes still exist for documentation
    from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory
except ImportError:  # pragma: no cover - exercised only without openmmml
    MLPotentialImpl = MLPotentialImplFactory = object

_OPTIONS = ("temperature", "tMin", "backend", "checkMasses")


class DiffEnergyPotentialImplFactory(MLPotentialImplFactory):
    """Creates :class:`DiffEnergyPotentialImpl` objects for ``MLPotential('diffenergy')``."""

    def createImpl(self, name: str, modelPath=None, **args) -> "DiffEnergyPotentialImpl":
        """Load the model file; see the module docstring for ``args``."""
        if modelPath is None:
            raise ValueError("MLPotential('diffenergy') needs modelPath=<model file written "
                             "by openmm_diffenergy.save_model>")
        unknown = set(args) - set(_OPTIONS)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for MLPotential('diffenergy'); "
                             f"known: modelPath, {', '.join(_OPTIONS)}")
        return DiffEnergyPotentialImpl(name, modelPath, **args)


class DiffEnergyPotentialImpl(MLPotentialImpl):
    """The ``diffenergy`` potential: a learned energy on a set of atoms.

    Parameters
    ----------
    name : str
        The potential's name (``"diffenergy"``).
    modelPath : str
        Model file.
    **options
        ``temperature``, ``tMin``, ``backend``, ``checkMasses`` (module docstring).
    """

    def __init__(self, name: str, modelPath, **options):
        from .io import load_model

        self.name = name
        self.modelPath = str(modelPath)
        self.model = load_model(self.modelPath)
        if self.model.n_particles is None:
            raise ValueError(f"{self.modelPath} is not a particle model (it has no particle "
                             "count); MLPotential needs one that acts on atoms")
        self.options = dict(options)

    def getMLLongRange(self) -> bool:
        """The learned energy is local to the ML atoms: no long-range part."""
        return False

    def addForces(self, topology, system, atoms, forceGroup: int, **args):
        """Add the learned force on ``atoms`` (all atoms if None) to ``system``.

        Parameters
        ----------
        topology : openmm.app.Topology
        system : openmm.System
        atoms : iterable of int or None
            Indices of the atoms the model acts on, in the model's particle order.
        forceGroup : int
            Force group of the learned force.
        **args
            Options that override those given to ``MLPotential`` (others, meant for an
            embedding method, are ignored).

        Raises
        ------
        ValueError
            If the number of atoms differs from the model's particle count, or the masses
            differ from the model's.
        """
        from openmm import unit

        from .openmm_force import add_learned_force

        opts = {**self.options, **{k: v for k, v in args.items() if k in _OPTIONS}}
        n_model = self.model.n_particles
        if atoms is None:
            n_top = topology.getNumAtoms()
            if n_top != n_model:
                raise ValueError(f"{self.modelPath} is a model for {n_model} particles, but "
                                 f"the Topology has {n_top} atoms")
            particles = list(range(n_top))
        else:
            particles = [int(i) for i in atoms]
            if len(particles) != n_model:
                raise ValueError(
                    f"{self.modelPath} is a model for {n_model} particles, but the ML "
                    f"region has {len(particles)} atoms (link-atom caps included, if the "
                    "region cuts covalent bonds); choose the atoms the model was trained on")
        meta = getattr(self.model, "metadata", {})
        temperature = opts.get("temperature", meta.get("temperature", 300.0))
        if not unit.is_quantity(temperature):
            temperature = float(temperature) * unit.kelvin
        return add_learned_force(system, self.model, masses=bool(opts.get("checkMasses", True)),
                                 temperature=temperature, t_min=opts.get("tMin"),
                                 particles=particles,
                                 backend=opts.get("backend", "torchforce"),
                                 force_group=int(forceGroup), name="DiffEnergy")
