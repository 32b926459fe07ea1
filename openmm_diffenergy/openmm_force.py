"""A learned energy as an ordinary OpenMM force.

``U(x) = kT * E_theta(x_sel / s, t_min)`` in kJ/mol for positions in nm, with
``kT = R T``. ``x_sel`` are the positions of the particles the model acts on (all of
them by default), split into ``n_replicas`` non-interacting copies whose energies are
evaluated in one batched call. Two backends:

- ``"torchforce"`` (default): the model is traced to TorchScript and run by
  OpenMM-Torch's ``TorchForce`` in C++ at every step.
- ``"pythonforce"``: ``openmm.PythonForce`` calls the eager model from Python; slower,
  but works with any torch build.

With ``scale_parameter`` the learned term is wrapped in a ``CustomCVForce`` whose energy
is ``scale_parameter * U``, a global parameter of the Context
(:func:`scaled_force`): lambda states and mixed Hamiltonians then change one parameter of
one Context instead of building a System per state.
"""
from __future__ import annotations

import logging
import math
import re
import warnings

import numpy as np
import openmm
import torch
from openmm import unit

from .io import load_model
from .models.base import model_dtype

__all__ = ["create_force", "add_learned_force", "scaled_force", "learned_energy",
           "kt_kj_per_mol", "load_openmmtorch", "serializer_abi_mismatch", "LEARNED_FORCE_GROUP",
           "LEARNED_SCALE"]

LEARNED_FORCE_GROUP = 1
LEARNED_SCALE = "lambda_learned"
_OPENMMTORCH_HINT = ("openmmtorch 1.5 is built against torch 2.9 and needs the CUDA build of "
                     "torch (for libnvrtc.so.12); install 'torch>=2.9,<2.10' and import torch "
                     "before openmmtorch, or use backend='pythonforce', which works with any "
                     "torch.")


_PLUGINS_RETRIED = False


def _retry_torch_plugins() -> None:
    """Load OpenMM-Torch platform plugins that failed when openmm was imported first.

    ``import openmm`` loads every plugin; if torch was not imported before it,
    ``libOpenMMTorchReference.so`` fails for want of ``libnvrtc.so.12`` and no
    platform can run a TorchForce. Importing torch makes that library available, so
    loading the plugin again now succeeds.
    """
    global _PLUGINS_RETRIED
    if _PLUGINS_RETRIED:
        return
    _PLUGINS_RETRIED = True
    for failure in openmm.Platform.getPluginLoadFailures():
        match = re.search(r"library (\S*OpenMMTorch\w*\.so)", failure)
        if match and "OpenCL" not in match.group(1):
            try:
                openmm.Platform.loadPluginLibrary(match.group(1))
            except Exception:  # pragma: no cover - that platform stays unavailable
                pass


class _SimtkWarningFilter(logging.Filter):
    """Drops the one warning that openmmtorch's ``import simtk.openmm`` logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "importing 'simtk.openmm' is deprecated" not in record.getMessage()


def load_openmmtorch():
    """Import openmmtorch, or raise an ImportError that says how to fix it.

    The SWIG wrapper of openmmtorch 1.5 imports the old ``simtk.openmm`` name, whose
    shim logs a deprecation warning on the root logger; that one message is filtered
    out during the import (nothing else is).
    """
    root = logging.getLogger()
    quiet = _SimtkWarningFilter()
    root.addFilter(quiet)
    try:
        import openmmtorch
    except Exception as err:
        raise ImportError(f"cannot load openmmtorch ({type(err).__name__}: {err}) with "
                          f"torch {torch.__version__}. {_OPENMMTORCH_HINT}") from None
    finally:
        root.removeFilter(quiet)
    _retry_torch_plugins()
    _warn_serializer_abi()
    return openmmtorch


_ABI_WARNED = False


def serializer_abi_mismatch() -> bool:
    """True where openmmtorch's XML reader was built against another OpenMM ABI.

    The openmmtorch 1.5 wheel was compiled against OpenMM 8.5, whose
    ``SerializationNode::getStringProperty`` returns ``const std::string&``. OpenMM 8.6
    returns ``std::string`` by value under the same symbol name, so the dynamic linker
    binds the call, the caller passes no return slot, and the callee reads the key from
    the wrong register: ``XmlSerializer.deserialize`` (and ``copy.deepcopy``,
    ``XmlSerializer.clone``, ``CustomCVForce`` around a TorchForce) segfault in
    ``findPropertyValue``. OpenMM 8.5.x is safe.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_plugin = version("openmmtorch")
    except PackageNotFoundError:  # pragma: no cover - a source build: trust it
        return False
    major_minor = tuple(int(p) for p in openmm.version.short_version.split(".")[:2])
    return torch_plugin.startswith("1.5") and major_minor >= (8, 6)


def _warn_serializer_abi() -> None:
    global _ABI_WARNED
    if not _ABI_WARNED and serializer_abi_mismatch():
        _ABI_WARNED = True
        warnings.warn(f"openmm {openmm.version.short_version} with openmmtorch 1.5: "
                      "openmm.XmlSerializer.deserialize and copy.deepcopy of a TorchForce "
                      "crash the interpreter (openmmtorch 1.5 was built against the OpenMM "
                      "8.5 ABI). Install openmm==8.5.2 (the pinned stack), or read XML with "
                      "openmm_diffenergy.deserialize_system and use backend='pythonforce' "
                      "inside CustomCVForce.", RuntimeWarning, stacklevel=3)


def _quantity(value, default_unit, name: str, positive: bool = True) -> float:
    if unit.is_quantity(value):
        if not value.unit.is_compatible(default_unit):
            raise ValueError(f"{name} must be in units compatible with {default_unit}, got "
                             f"{value.unit}")
        value = value.value_in_unit(default_unit)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or an openmm.unit quantity, "
                         f"got {value!r}") from None
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a positive finite number of {default_unit}, "
                         f"got {value}")
    return value


ZERO_SEED = 2 ** 31 - 1


def openmm_seed(seed) -> int:
    """The OpenMM random-number seed for a user's integer ``seed``.

    OpenMM integrators read 0 as "choose a new seed for every Context", so ``seed=0``
    (this package's usual default) made Langevin runs irreproducible. 0 maps to
    :data:`ZERO_SEED`; every other seed is passed on unchanged.
    """
    seed = int(seed)
    return ZERO_SEED if seed == 0 else seed


def kt_kj_per_mol(temperature) -> float:
    """``kT = R T`` in kJ/mol; ``temperature`` in kelvin or an openmm.unit quantity."""
    t = _quantity(temperature, unit.kelvin, "temperature")
    r = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
    return r * t


class _BatchedEnergy(torch.nn.Module):
    """``E(y, t_min)`` for a fixed batch of replicas: (R, dim) -> (R,) in kT."""

    def __init__(self, model, t_min: float, n_replicas: int):
        super().__init__()
        self.model = model
        self.t_min = float(t_min)
        self.n_replicas = int(n_replicas)

    def forward(self, y):
        t = torch.full((self.n_replicas,), self.t_min, dtype=y.dtype, device=y.device)
        return self.model(y, t)


class TorchEnergy(torch.nn.Module):
    """TorchForce module: positions (n_total, 3) nm -> energy kJ/mol."""

    def __init__(self, core, indices, n_replicas: int, dim: int, length_scale: float, kt: float,
                 dtype: torch.dtype):
        super().__init__()
        self.core = core
        self.register_buffer("indices", indices)
        self.n_replicas = n_replicas
        self.dim = dim
        self.scale = 1.0 / length_scale
        self.kt = kt
        self.dtype = dtype

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("openmm_diffenergy: positions hold NaN or inf values")
        pos = positions.to(self.dtype).index_select(0, self.indices)
        y = pos.reshape(self.n_replicas, self.dim) * self.scale
        return self.core(y).sum().to(torch.float64) * self.kt


class TorchEnergyForces(TorchEnergy):
    """TorchForce module that returns its own forces: -> (energy kJ/mol, forces kJ/mol/nm)."""

    def forward(self, positions: torch.Tensor):  # type: ignore[override]
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("openmm_diffenergy: positions hold NaN or inf values")
        pos = positions.detach().to(self.dtype).requires_grad_(True)
        y = pos.index_select(0, self.indices).reshape(self.n_replicas, self.dim) * self.scale
        energy = self.core(y).sum() * self.kt
        grads = torch.autograd.grad([energy], [pos])
        grad = grads[0]
        if grad is None:
            grad = torch.zeros_like(pos)
        return energy.detach().to(torch.float64), (-grad).to(positions.dtype)


class PythonForceComputation:
    """The computation of a ``PythonForce``: a picklable callable over an eager model.

    ``openmm.PythonForce`` (OpenMM 8.5) hands the callable the positions of every
    particle of the System and takes forces for every particle back, so the callable
    picks the model's particles itself (``indices``, replica-major) and returns zero
    force on the others.
    """

    def __init__(self, model, t_min: float, n_replicas: int, kt: float, indices):
        self.model = model
        self.t_min = float(t_min)
        self.n_replicas = int(n_replicas)
        self.kt = float(kt)
        self.dtype = model_dtype(model)
        self.indices = np.asarray(indices, dtype=np.int64)

    def __call__(self, state):
        pos = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        sel = pos[self.indices]
        if not np.isfinite(sel).all():
            raise ValueError("openmm_diffenergy: positions hold NaN or inf values")
        x = torch.tensor(sel, dtype=self.dtype, requires_grad=True)
        y = x.reshape(self.n_replicas, self.model.dim) / self.model.length_scale
        t = torch.full((self.n_replicas,), self.t_min, dtype=self.dtype)
        with torch.enable_grad():
            energy = self.model(y, t).sum() * self.kt
            (grad,) = torch.autograd.grad(energy, x)
        forces = np.zeros(pos.shape, dtype=np.float64)
        forces[self.indices] = (-grad).detach().to(torch.float64).numpy()
        return float(energy.detach()), forces


def _resolve_model(model_or_path):
    """A model instance as it is, or the model saved at a path."""
    if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
        return load_model(model_or_path)
    return model_or_path


def _indices(particles, n_replicas: int, n_particles: int) -> torch.Tensor:
    total = n_replicas * n_particles
    if particles is None:
        return torch.arange(total, dtype=torch.int64)
    idx = np.asarray(particles)
    if idx.dtype.kind not in "iu":
        raise ValueError(f"particles must be integer indices, got dtype {idx.dtype}")
    idx = idx.reshape(-1)
    if idx.size != total:
        raise ValueError(f"particles holds {idx.size} indices; the model acts on "
                         f"{n_particles} particles x {n_replicas} replicas = {total}")
    if (idx < 0).any() or len(np.unique(idx)) != idx.size:
        raise ValueError("particles must be distinct non-negative indices")
    return torch.as_tensor(idx, dtype=torch.int64)


def create_force(model_or_path, temperature=300.0 * unit.kelvin, t_min: float | None = None,
                 particles=None, backend: str = "torchforce", n_replicas: int = 1,
                 outputs_forces: bool = True, force_group: int = LEARNED_FORCE_GROUP,
                 name: str = "DiffEnergy", scale_parameter: str | None = None,
                 scale: float = 1.0) -> openmm.Force:
    """Make an OpenMM force from a learned energy: ``U = kT E_theta(x / s, t_min)``.

    Parameters
    ----------
    model_or_path : EnergyModel or str
        A model, or a file saved by :func:`openmm_diffenergy.io.save_model`.
    temperature : openmm.unit.Quantity or float
        Temperature of ``kT`` (kelvin if a plain number). Default 300 K.
    t_min : float, optional
        Diffusion time at which the energy is read; default ``model.t_min``.
    particles : array-like of int, optional
        Indices of the System's particles the model acts on, shape (N,) or
        (n_replicas, N); replica r is row r. Default: particles ``0 .. n_replicas*N - 1``.
    backend : {"torchforce", "pythonforce"}
    n_replicas : int
        Non-interacting copies of the molecule evaluated in one batched call.
    outputs_forces : bool
        TorchForce only: the module computes forces itself (one fused backward pass)
        instead of leaving autograd to OpenMM-Torch.
    force_group : int
        Force group (0-31) of the learned term, so its energy can be read on its own
        (:func:`learned_energy`). Default 1.
    name : str
        The force's name.
    scale_parameter : str, optional
        Name of a global Context parameter that multiplies the learned energy, e.g.
        :data:`LEARNED_SCALE` (``"lambda_learned"``): the force is then a
        ``CustomCVForce`` with energy ``scale_parameter * U`` around the learned force,
        and ``context.setParameter(scale_parameter, value)`` changes the scale.
    scale : float
        Default value of ``scale_parameter`` (its value in a new Context).

    Returns
    -------
    openmm.Force
        ``openmmtorch.TorchForce`` or ``openmm.PythonForce``; with ``scale_parameter``,
        an ``openmm.CustomCVForce`` that holds one of them.
    """
    if backend not in ("torchforce", "pythonforce"):
        raise ValueError(f"backend must be 'torchforce' or 'pythonforce', got {backend!r}")
    model = _resolve_model(model_or_path)
    if model.n_particles is None:
        raise ValueError("create_force needs a particle model (positions of shape (N, 3))")
    if int(n_replicas) != n_replicas or n_replicas < 1:
        raise ValueError(f"n_replicas must be a positive integer, got {n_replicas}")
    if not 0 <= int(force_group) <= 31:
        raise ValueError(f"force_group must lie in 0..31, got {force_group}")
    t_min = model.t_min if t_min is None else float(t_min)
    if not 0.0 <= t_min <= 1.0:
        raise ValueError(f"t_min must lie in [0, 1], got {t_min}")
    kt = kt_kj_per_mol(temperature)
    idx = _indices(particles, int(n_replicas), model.n_particles)
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    if backend == "pythonforce":
        force = openmm.PythonForce(PythonForceComputation(model, t_min, n_replicas, kt,
                                                          idx.numpy()))
    else:
        openmmtorch = load_openmmtorch()
        dtype = model_dtype(model)
        core = _BatchedEnergy(model, t_min, n_replicas)
        example = torch.zeros(n_replicas, model.dim, dtype=dtype)
        example += torch.randn(example.shape, generator=torch.Generator().manual_seed(0),
                               dtype=dtype)
        with torch.no_grad():
            traced = torch.jit.trace(core, example, check_trace=False)
        cls = TorchEnergyForces if outputs_forces else TorchEnergy
        module = torch.jit.script(cls(traced, idx, int(n_replicas), model.dim,
                                      model.length_scale, kt, dtype))
        force = openmmtorch.TorchForce(module)
        force.setOutputsForces(bool(outputs_forces))
    if scale_parameter is not None:
        force.setName(name)
        force = scaled_force([force], scale_parameter, {scale_parameter: scale})
    force.setForceGroup(int(force_group))
    force.setName(name)
    return force


def scaled_force(forces, scale: str, parameters: dict) -> openmm.CustomCVForce:
    """One ``CustomCVForce`` with energy ``scale * (U_0 + U_1 + ...)``.

    Parameters
    ----------
    forces : sequence of openmm.Force
        The terms to scale; the CustomCVForce takes them over (they must not belong to a
        System already).
    scale : str
        An expression in global parameters, e.g. ``"lambda_learned"`` or
        ``"1 - lambda_state"``.
    parameters : dict
        Global parameters the expression uses, name -> default value.

    Returns
    -------
    openmm.CustomCVForce
        Collective variables ``u0, u1, ...`` (kJ/mol).
    """
    forces = list(forces)
    if not forces:
        raise ValueError("scaled_force needs at least one force")
    for name in parameters:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise ValueError(f"{name!r} is not a valid global parameter name")
    terms = "+".join(f"u{i}" for i in range(len(forces)))
    cv = openmm.CustomCVForce(f"({scale})*({terms})")
    for name, value in parameters.items():
        cv.addGlobalParameter(str(name), float(value))
    for i, f in enumerate(forces):
        cv.addCollectiveVariable(f"u{i}", f)
    return cv


def add_learned_force(system: openmm.System, model_or_path, masses: bool = False,
                      **kwargs) -> openmm.Force:
    """Check a learned energy against a System, then add it (see :func:`create_force`).

    Parameters
    ----------
    system : openmm.System
    model_or_path : EnergyModel or str
    masses : bool
        If True and the model's metadata holds ``masses`` (dalton), they must match the
        System's masses of the selected particles.
    **kwargs
        Passed to :func:`create_force`.

    Raises
    ------
    ValueError
        If the System has too few particles for the model, the selection or replicas, or
        masses differ.
    """
    model = _resolve_model(model_or_path)
    n_rep = int(kwargs.get("n_replicas", 1))
    idx = _indices(kwargs.get("particles"), n_rep, model.n_particles)
    n_sys = system.getNumParticles()
    if kwargs.get("particles") is None and n_sys != n_rep * model.n_particles:
        raise ValueError(f"the System has {n_sys} particles but the model acts on "
                         f"{model.n_particles} x {n_rep} replicas = {n_rep * model.n_particles}; "
                         "pass particles= to select a subset")
    if int(idx.max()) >= n_sys:
        raise ValueError(f"particle index {int(idx.max())} is out of range for a System of "
                         f"{n_sys} particles")
    want = getattr(model, "metadata", {}).get("masses")
    if masses and want is not None:
        have = [system.getParticleMass(int(i)).value_in_unit(unit.dalton) for i in idx]
        want = list(want) * n_rep
        if not np.allclose(have, want, rtol=1e-3):
            raise ValueError("the System's particle masses differ from the masses the model "
                             "was trained with")
    force = create_force(model, **kwargs)
    system.addForce(force)
    return force


def learned_energy(context: openmm.Context, group: int = LEARNED_FORCE_GROUP):
    """Potential energy of one force group (the learned term by default), as a Quantity."""
    return context.getState(getEnergy=True, groups={int(group)}).getPotentialEnergy()
