"""Denoising score matching for energy-parameterized models, with optional FP regularization.

For data ``y_0`` (centred positions divided by the model's length scale), times
``t ~ U(t_eps, 1)`` and noise ``eps`` on the model's space, ``y_t = alpha y_0 + sigma eps``
and the loss is ``E |sigma s(y_t, t) + eps|^2`` with ``s = -grad_y E`` (the usual
``lambda(t) = sigma^2`` weighting). Weights are averaged with an EMA, which is what is
saved. With ``fp_weight > 0`` the Fokker-Planck residual of ``log p_t = -E`` (Plainer
et al. 2025) is penalized; the unknown ``d_t log Z(t)`` is removed by centring the
residual over samples that share a time (batch centring), and ``div s`` is estimated with
one Rademacher probe.

With data scores ``g_0 = grad log p_0(y_0)`` (for Boltzmann data, forces over ``kT``) the
regression target becomes the mixture of target score matching (De Bortoli et al. 2024)
and DSM, ``kappa g_0 / alpha - (1 - kappa) eps / sigma`` with
``kappa = alpha^2 / (alpha^2 + sigma^2 P)``. Both terms have the true score
``grad log p_t(y_t)`` as their conditional mean, so the minimizer is unchanged; the mixture
is exact (zero variance) for a Gaussian of precision ``P`` and keeps the variance of the
target of order one at every t, where DSM's grows like ``1 / sigma^2`` as ``t -> 0``.
That is what lets the small times, where the learned energy is read, be learned.

Training writes atomic checkpoints (model, EMA, optimizer, scheduler, step, RNG state,
running loss, history) and resumes from them; a resumed run ends with the same weights, to
the bit, as an uninterrupted one with the same seed. A checkpoint holds only tensors and
plain containers and is read with ``torch.load(..., weights_only=True)``, so a file put
beside the output cannot run code when training resumes from it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import re
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from .coordinates import centre, subspace_noise
from .io import _atomic_torch_save
from .models.base import energy_and_score

__all__ = ["TrainConfig", "train", "train_and_save", "init_from", "dsm_loss", "fp_residual"]

CHECKPOINT_FORMAT = "openmm_diffenergy.checkpoint"
_CHECKPOINT_VERSION = 2      # 1: the same dict without format, running loss and seconds
_CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "generator", "step", "history")
_START_OVER = "delete it (or pass --fresh to 'diffenergy train') to start over"


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes
    ----------
    steps : int
        Optimizer steps in total (a resumed run continues to this count).
    batch_size : int
    lr : float
        Adam learning rate (cosine-decayed to 10% over ``steps``).
    ema_decay : float
    t_eps : float
        Smallest training time.
    t_power : float
        Times are drawn as ``t_eps + (1 - t_eps) u^t_power``, ``u ~ U(0, 1)``; values above 1
        spend more of training near ``t_min``, where the learned energy is read.
    fp_weight : float
        Weight of the Fokker-Planck penalty (0 disables it).
    fp_times : int
        Distinct times per batch for the FP term (samples are centred within a time).
    fp_t_max : float
        FP times are drawn like training times but on ``[t_eps, fp_t_max]``; a small value
        spends the penalty on the times where the learned energy is read.
    fp_scale : str
        ``"none"`` squares the raw residual; ``"sigma2"`` multiplies it by ``sigma(t)^2``
        first. Near ``t_min`` raw residuals are of order ``D / sigma^2`` (1e3 to 1e4 for
        alanine dipeptide at ``t = 1e-3``) and swamp the DSM loss; scaled ones are O(1).
    tsm_precision : float, optional
        ``P`` of the target-score mixture (model units, 1 / length_scale^2), used only when
        :func:`train` gets ``scores``. ``None`` takes the largest per-coordinate mean of
        ``g_0^2`` over the data, about the precision of the stiffest mode, so that DSM takes
        over once the noise is wider than that mode.
    train_only : list of str, optional
        Train only the parameters whose names start with one of these prefixes (e.g.
        ``["prior.gain_coeffs"]`` to fit the prior's time-dependent gains of a trained
        model and leave its network as it is); ``None`` trains everything.
    checkpoint_every : int
    seed : int
    """

    steps: int = 20000
    batch_size: int = 256
    lr: float = 1e-3
    ema_decay: float = 0.999
    t_eps: float = 1e-3
    t_power: float = 1.0
    fp_weight: float = 0.0
    fp_times: int = 8
    fp_t_max: float = 1.0
    fp_scale: str = "none"
    tsm_precision: float | None = None
    train_only: list | None = None
    checkpoint_every: int = 500
    seed: int = 0
    history: list = field(default_factory=list, repr=False)


def dsm_loss(model, sde, y0: torch.Tensor, t: torch.Tensor, generator=None,
             g0: torch.Tensor | None = None, precision: float | None = None) -> torch.Tensor:
    """Denoising score-matching loss ``mean |sigma s(y_t, t) + eps|^2 / D``.

    With data scores ``g0`` the target is the TSM/DSM mixture of the module docstring:
    ``mean |sigma s - kappa sigma g0 / alpha + (1 - kappa) eps|^2 / D``.

    Parameters
    ----------
    model : EnergyModel
    sde : LinearSDE
    y0 : torch.Tensor, shape (B, dim)
        Centred model coordinates.
    t : torch.Tensor, shape (B,)
    g0 : torch.Tensor, shape (B, dim), optional
        ``grad log p_0`` at ``y0`` in model units, centred.
    precision : float, optional
        ``P`` of the mixture weight; required with ``g0``.
    """
    eps = subspace_noise(y0.shape, model.n_particles, generator=generator, dtype=y0.dtype)
    a = sde.alpha(t)[:, None].to(y0.dtype)
    s = sde.sigma(t)[:, None].to(y0.dtype)
    yt = (a * y0 + s * eps).detach().requires_grad_(True)
    _, score = energy_and_score(model, yt, t, create_graph=True)
    if g0 is None:
        r = s * score + eps
    else:
        kappa = a * a / (a * a + s * s * precision)
        r = s * score - kappa * s * g0 / a + (1 - kappa) * eps
    return (r ** 2).sum(-1).mean() / model.dof


def fp_residual(model, sde, y: torch.Tensor, t: torch.Tensor, probes: int | None = 1,
                generator=None) -> torch.Tensor:
    """Fokker-Planck residual of ``log p_t = -E`` at ``(y, t)``, shape (B,).

    ``r = d_t log p - [-div f - f.s + 1/2 g^2 (div s + |s|^2)]`` with ``s = -grad E``.
    The exact diffused density has ``r = -d_t log Z(t)``, a function of ``t`` only.
    ``probes=None`` takes the exact divergence (one backward pass per dimension).
    """
    y = y.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    e = model(y, t)
    gy, gt = torch.autograd.grad(e.sum(), (y, t), create_graph=True)
    s = -gy
    if probes is None:
        div = torch.zeros_like(e)
        for i in range(y.shape[1]):
            div = div + torch.autograd.grad(s[:, i].sum(), y, create_graph=True)[0][:, i]
    else:
        div = torch.zeros_like(e)
        for _ in range(probes):
            v = torch.randint(0, 2, y.shape, generator=generator).to(y.dtype) * 2 - 1
            div = div + (torch.autograd.grad((s * v).sum(), y, create_graph=True)[0]
                         * v).sum(-1) / probes
    a = sde.drift_coeff(t.detach()).to(y.dtype)
    g2 = sde.g2(t.detach()).to(y.dtype)
    rhs = -a * model.dof - a * (y * s).sum(-1) + 0.5 * g2 * (div + (s * s).sum(-1))
    return -gt - rhs


def _plain(obj):
    """``obj`` as plain containers (dict, list, str, int, float, bool, None) and tensors,
    which ``torch.load(..., weights_only=True)`` reads back; numpy scalars become Python
    numbers. Raises TypeError for anything else."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return obj.item()
    raise TypeError(f"a training checkpoint holds only tensors and plain containers; "
                    f"got {type(obj).__name__}")


def _load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`train` with ``weights_only=True``.

    Raises
    ------
    ValueError
        Naming ``path``, if the file would need arbitrary objects unpickled (it is refused
        unread: unpickling can run code), cannot be read, or is not a training checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" (it needs {found.group(1)})" if found else ""
        raise ValueError(f"refused the training checkpoint {path}: it is not a plain-tensor "
                         f"checkpoint{what}, and reading it would unpickle Python objects, "
                         f"which can run code; {_START_OVER}") from None
    except Exception as err:
        raise ValueError(f"cannot read the training checkpoint {path}: it is truncated or "
                         f"not a checkpoint ({type(err).__name__}: {err}); "
                         f"{_START_OVER}") from None
    if (not isinstance(state, dict) or state.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT
            or not all(k in state for k in _CHECKPOINT_KEYS)):
        raise ValueError(f"{path} is not a training checkpoint of openmm_diffenergy; "
                         f"{_START_OVER}")
    if state.get("format_version", 1) > _CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer openmm_diffenergy (checkpoint "
                         f"format {state['format_version']}); upgrade the package or "
                         f"{_START_OVER}")
    return state


@contextlib.contextmanager
def _trainable(model, prefixes, log):
    """The parameters to optimize: all of them, or those whose names start with one of
    ``prefixes``; the others are frozen inside the block and their ``requires_grad`` flags
    are restored after it, also when training stops with an error."""
    named = list(model.named_parameters())
    if not prefixes:
        yield [p for _, p in named]
        return
    chosen = [(n, p) for n, p in named if n.startswith(tuple(prefixes))]
    if not chosen:
        raise ValueError(f"train_only {list(prefixes)} matches no parameter of the model "
                         f"(it has {[n for n, _ in named][:6]} ...)")
    log(f"training only {', '.join(n for n, _ in chosen)}")
    flags = [p.requires_grad for _, p in named]
    ids = {id(p) for _, p in chosen}
    try:
        for _, p in named:
            p.requires_grad_(id(p) in ids)
        yield [p for _, p in chosen]
    finally:
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)


def train(model, positions: torch.Tensor, sde=None, config: TrainConfig | None = None,
          checkpoint: str | None = None, progress: bool = True, log=print,
          scores: torch.Tensor | None = None):
    """Train an energy model on positions by denoising score matching.

    Parameters
    ----------
    model : EnergyModel
        Particle model; trained in place. On return it holds the EMA weights.
    positions : torch.Tensor or array-like, shape (F, N, 3)
        Training configurations in nm (centred here, divided by ``model.length_scale``).
    sde : LinearSDE, optional
        Default ``model.sde``.
    config : TrainConfig, optional
    checkpoint : str, optional
        File for atomic checkpoints; if it exists, training resumes from it. It is read
        with ``weights_only=True``: a file that holds anything but tensors and plain
        containers is refused (ValueError) without being unpickled.
    progress : bool
    log : callable
        Receives one line of text per log interval.
    scores : torch.Tensor or array-like, shape (F, N, 3), optional
        ``grad log p_0`` of every configuration in 1/nm: for Boltzmann-distributed data,
        forces (kJ/mol/nm) divided by ``kT`` (kJ/mol), e.g. from
        :func:`~openmm_diffenergy.reweighting.potential_forces`. For mapped (coarse-grained)
        data, mapped forces work too: their conditional mean is the mean force. Switches
        the loss to the TSM/DSM mixture.

    Returns
    -------
    dict
        ``history`` (step, loss, fp, seconds) and the final ``config`` (with the
        ``tsm_precision`` used).
    """
    config = config or TrainConfig()
    sde = sde or model.sde
    if config.fp_scale not in ("none", "sigma2"):
        raise ValueError(f"fp_scale must be 'none' or 'sigma2', got {config.fp_scale!r}")
    if not config.t_eps < config.fp_t_max <= 1:
        raise ValueError(f"fp_t_max must lie in (t_eps, 1], got {config.fp_t_max}")
    positions = torch.as_tensor(positions)
    if positions.dim() != 3 or positions.shape[1:] != (model.n_particles, 3):
        raise ValueError(f"positions have shape {tuple(positions.shape)}; expected "
                         f"(F, {model.n_particles}, 3)")
    if not torch.isfinite(positions).all():
        raise ValueError("positions hold NaN or inf values")
    y_all = centre(positions.reshape(positions.shape[0], -1).float(), model.n_particles)
    y_all = y_all / model.length_scale
    g_all = None
    if scores is not None:
        scores = torch.as_tensor(scores, dtype=torch.float32)
        if tuple(scores.shape) != tuple(positions.shape):
            raise ValueError(f"scores have shape {tuple(scores.shape)}; expected "
                             f"{tuple(positions.shape)}, one per position")
        if not torch.isfinite(scores).all():
            raise ValueError("scores hold NaN or inf values")
        g_all = centre(scores.reshape(scores.shape[0], -1).float(), model.n_particles)
        g_all = g_all * model.length_scale
        if config.tsm_precision is None:
            config = replace(config, tsm_precision=float(g_all.pow(2).mean(0).max()))
        if not (math.isfinite(config.tsm_precision) and config.tsm_precision > 0):
            raise ValueError(f"tsm_precision must be positive, got {config.tsm_precision}")
        log(f"target score matching: data scores given, precision P = "
            f"{config.tsm_precision:.4g} (model units)")
    with _trainable(model, config.train_only, log) as params:
        opt = torch.optim.Adam(params, lr=config.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k, config.steps)
                                                             / config.steps)))
        ema = copy.deepcopy(model).eval()
        gen = torch.Generator().manual_seed(config.seed)
        step, history, running, before = 0, [], None, 0.0
        if checkpoint and os.path.exists(checkpoint):
            state = _load_checkpoint(checkpoint)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            step, history = int(state["step"]), list(state["history"])
            running, before = state.get("running"), float(state.get("seconds", 0.0))
            log(f"resumed from {checkpoint} at step {step}")

        def save():
            _atomic_torch_save({"format": CHECKPOINT_FORMAT,
                                "format_version": _CHECKPOINT_VERSION,
                                "model": model.state_dict(), "ema": ema.state_dict(),
                                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                "generator": gen.get_state(), "step": step,
                                "running": running, "seconds": elapsed(),
                                "history": _plain(history), "config": _plain(asdict(config))},
                               checkpoint)

        model.train()
        start = time.perf_counter()

        def elapsed():
            return before + time.perf_counter() - start

        bar = tqdm(total=config.steps, initial=step, desc="train", disable=not progress)
        while step < config.steps:
            idx = torch.randint(0, y_all.shape[0], (config.batch_size,), generator=gen)
            y0 = y_all[idx]
            u = torch.rand(config.batch_size, generator=gen) ** config.t_power
            t = config.t_eps + (1 - config.t_eps) * u
            loss = dsm_loss(model, sde, y0, t, gen, g0=None if g_all is None else g_all[idx],
                            precision=config.tsm_precision)
            fp = torch.zeros(())
            if config.fp_weight > 0:
                k = config.fp_times
                per = max(1, config.batch_size // (4 * k))
                tf = (config.t_eps + (config.fp_t_max - config.t_eps)
                      * torch.rand(k, generator=gen) ** config.t_power).repeat_interleave(per)
                y_fp = y_all[torch.randint(0, y_all.shape[0], (tf.shape[0],), generator=gen)]
                eps = subspace_noise(y_fp.shape, model.n_particles, generator=gen,
                                     dtype=y_fp.dtype)
                y_fp = sde.alpha(tf)[:, None] * y_fp + sde.sigma(tf)[:, None] * eps
                r = fp_residual(model, sde, y_fp, tf, generator=gen)
                if config.fp_scale == "sigma2":
                    r = r * sde.sigma2(tf).to(r.dtype)
                r = r.reshape(k, per)
                fp = ((r - r.mean(1, keepdim=True)) ** 2).mean()
                loss = loss + config.fp_weight * fp
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - config.ema_decay)
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if step % 100 == 0 or step == config.steps:
                history.append({"step": step, "loss": running, "fp": float(fp.detach()),
                                "seconds": elapsed()})
            if step % max(1, config.checkpoint_every // 5) == 0:
                log(f"step {step} loss {running:.4f} fp {float(fp.detach()):.4f} "
                    f"lr {sched.get_last_lr()[0]:.2e} {elapsed():.0f} s")
            if checkpoint and (step % config.checkpoint_every == 0 or step == config.steps):
                save()
        bar.close()
    model.load_state_dict(ema.state_dict())
    model.eval()
    return {"history": history, "config": asdict(config)}


def init_from(model, path: str) -> list:
    """Start a fine-tune: copy the weights of a saved model into ``model``.

    Parameters the file lacks (new options, e.g. the prior's ``gain_coeffs``) keep their
    initial values. Training then starts at step 0 with a fresh optimizer; a checkpoint
    beside the output, if there is one, still takes precedence.

    Parameters
    ----------
    model : EnergyModel
    path : str
        A model file (:func:`openmm_diffenergy.save_model`).

    Returns
    -------
    list of str
        The names of the parameters and buffers left at their initial values.

    Raises
    ------
    ValueError
        If the file holds weights that ``model`` does not have, or of other shapes.
    """
    from .io import load_model

    src = load_model(path)
    try:
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    except RuntimeError as err:
        raise ValueError(f"cannot start from {path}: {str(err).splitlines()[-1].strip()}") \
            from None
    if unexpected:
        raise ValueError(f"cannot start from {path}: it has weights the model lacks "
                         f"({', '.join(unexpected[:4])}); another architecture?")
    return list(missing)


def train_and_save(model, positions: torch.Tensor, out: str, config: TrainConfig | None = None,
                   header=(), progress: bool = True, training_info: dict | None = None,
                   scores: torch.Tensor | None = None, **metadata) -> dict:
    """Train a model with checkpoints beside ``out``, save it there, and log the run.

    The checkpoint is ``<out>.ckpt`` (a rerun resumes from it) and the log, appended to,
    is ``<out>.log``.

    Parameters
    ----------
    model : EnergyModel
        Particle model of a registered class; trained in place.
    positions : torch.Tensor, shape (F, N, 3)
        Training configurations, nm.
    out : str
        Model file to write (:func:`openmm_diffenergy.save_model`).
    config : TrainConfig, optional
    header : sequence of str
        Lines written to the log before training (command, data description).
    progress : bool
        Show a progress bar.
    training_info : dict, optional
        Extra entries for the ``training`` metadata (data file, frames, command).
    scores : torch.Tensor, shape (F, N, 3), optional
        Data scores for target score matching (see :func:`train`).
    **metadata
        Stored in the model file (masses, temperature, particle selection, ...).

    Returns
    -------
    dict
        :func:`train`'s result (``history``, ``config``).
    """
    from .io import save_model

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".log", "a") as logfile:
        def log(line):
            print(line, file=logfile, flush=True)

        for line in header:
            log(line)
        result = train(model, positions, config=config, checkpoint=out + ".ckpt",
                       progress=progress, log=log, scores=scores)
        save_model(model, out, **metadata,
                   training={**result["config"], "history": result["history"][-5:],
                             **(training_info or {})})
        log(f"saved {out}")
    return result
