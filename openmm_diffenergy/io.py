"""Saved models: one file that carries the weights and everything needed to use them.

A file holds a dict written by ``torch.save``::

    {"format": "openmm_diffenergy.model", "format_version": 1,
     "class": <registered class name>, "config": <constructor arguments>,
     "state_dict": ..., "metadata": {...}}

``metadata`` records the SDE, length scale (nm), particle count and selection, masses
(dalton), temperature (K), t_min, units and the package version. Files are written
atomically, so an interrupted save never leaves a half-written model behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import torch

__all__ = ["save_model", "load_model", "register_model", "atomic_write", "MODEL_FORMAT"]

MODEL_FORMAT = "openmm_diffenergy.model"
FORMAT_VERSION = 1
_REGISTRY: dict = {}


def register_model(cls):
    """Class decorator: make a model class loadable by :func:`load_model`.

    The class must provide ``config()`` (JSON-like constructor arguments) and
    ``from_config(config)``.
    """
    _REGISTRY[cls.__name__] = cls
    return cls


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one step.

    If the block raises, the temporary file is removed and ``path`` is left as it was,
    so an interrupted write never leaves a half-written file behind. The file gets the
    usual permissions (``0o666`` less the umask), not the private ones of ``mkstemp``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_torch_save(obj, path: str) -> None:
    with atomic_write(path) as fh:
        torch.save(obj, fh)


def save_model(model, path: str, **metadata) -> str:
    """Save a model and its metadata to one file.

    Parameters
    ----------
    model : EnergyModel
        A model of a registered class.
    path : str
        Destination file (conventionally ``.pt``).
    **metadata
        Extra entries (for example ``masses``, ``temperature``, ``particle_selection``,
        ``training``); they are stored alongside the standard ones.

    Returns
    -------
    str
        ``path``.
    """
    from . import __version__

    name = type(model).__name__
    if name not in _REGISTRY:
        raise ValueError(f"{name} is not a registered model class; decorate it with "
                         "openmm_diffenergy.io.register_model")
    sde = getattr(model, "sde", None)
    meta = {"package_version": __version__, "n_particles": model.n_particles,
            "dim": model.dim, "dof": model.dof, "length_scale_nm": model.length_scale,
            "t_min": model.t_min, "sde": sde.config() if sde is not None else None,
            "units": {"positions": "nm", "energy": "kT", "length_scale": "nm"}}
    meta.update(metadata)
    payload = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "class": name,
               "config": model.config(), "state_dict": model.state_dict(), "metadata": meta}
    _atomic_torch_save(payload, str(path))
    return str(path)


def load_model(path: str, n_particles: int | None = None, model_class: str | None = None):
    """Load a model saved by :func:`save_model`.

    Parameters
    ----------
    path : str
    n_particles : int, optional
        If given, the model must be for this many particles.
    model_class : str, optional
        If given, the file must hold this class (architecture).

    Returns
    -------
    model : EnergyModel
        In eval mode, with ``model.metadata`` set to the file's metadata.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is truncated, not a model file, of another architecture or for
        another particle count.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read model file {path}: it is truncated or not a "
                         f"openmm_diffenergy model ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an openmm_diffenergy model file")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer openmm_diffenergy (format "
                         f"{payload['format_version']}); upgrade the package")
    name = payload.get("class")
    if model_class is not None and name != model_class:
        raise ValueError(f"{path} holds a {name} model, expected {model_class}")
    if name not in _REGISTRY:
        raise ValueError(f"{path} holds an unknown model class {name!r}; known: "
                         f"{sorted(_REGISTRY)}")
    model = _REGISTRY[name].from_config(payload["config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit a {name} built from its own "
                         f"config ({err})") from None
    model.metadata = dict(payload.get("metadata", {}))
    if n_particles is not None and model.n_particles != n_particles:
        raise ValueError(f"{path} is a model for {model.n_particles} particles, but "
                         f"{n_particles} were given")
    return model.eval()
