"""PNG plots for reweighting and energy comparison (matplotlib, Agg canvas).

matplotlib is imported inside each function and drawn on an Agg canvas of its own, so
importing this module costs nothing and the user's pyplot backend is left alone.
"""
from __future__ import annotations

import numpy as np

__all__ = ["plot_free_energy_profiles", "plot_ramachandran", "plot_energy_scatter",
           "plot_funnel"]


def _figure(ncols: int = 1, size=(5.0, 4.0)):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is a listed dependency
        raise ImportError("plots need matplotlib: pip install matplotlib") from err
    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: str) -> str:
    from .io import atomic_write

    with atomic_write(str(path)) as fh:
        fig.savefig(fh, format="png", dpi=110)
    return str(path)


def plot_free_energy_profiles(profiles: dict, path: str, xlabel: str = "CV",
                              energy_unit: str = "kT", title: str | None = None,
                              ymax: float | None = None) -> str:
    """Free-energy profiles with bootstrap error bars on one axis.

    Parameters
    ----------
    profiles : dict of str -> FreeEnergyProfile
        Label -> profile (e.g. "reference MD", "reweighted i.i.d.").
    path : str
        Output PNG.
    energy_unit : {"kT", "kJ/mol"}
    ymax : float, optional
        Upper limit of the axis (in ``energy_unit``; the lower one is just below the
        lowest profile value); the rest is clipped, so that a badly reweighted profile
        and its error bars do not flatten the others.

    Returns
    -------
    str
        ``path``.
    """
    if energy_unit not in ("kT", "kJ/mol"):
        raise ValueError(f"energy_unit must be 'kT' or 'kJ/mol', got {energy_unit!r}")
    fig, (ax,) = _figure()
    for label, prof in profiles.items():
        f = prof.f_kt if energy_unit == "kT" else prof.f_kj_per_mol
        e = prof.error_kt if energy_unit == "kT" else prof.error_kj_per_mol
        ok = np.isfinite(f)
        ax.errorbar(prof.centres[ok], f[ok], yerr=np.nan_to_num(e[ok]), label=label,
                    capsize=2, marker="o", ms=3, lw=1)
    if ymax is not None:
        low = min([0.0] + [float(np.min(p.f_kt[np.isfinite(p.f_kt)])) * (
            1.0 if energy_unit == "kT" else p.kt_kj_per_mol)
            for p in profiles.values() if np.isfinite(p.f_kt).any()])
        ax.set_ylim(low - 0.05 * (float(ymax) - low), float(ymax))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"free energy ({energy_unit})")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ramachandran(panels: dict, path: str, bins: int = 60) -> str:
    """Weighted phi/psi free-energy maps, one panel per entry.

    Parameters
    ----------
    panels : dict of str -> (phi, psi) or (phi, psi, weights)
        Radians, shape (n,) each; weights optional.
    path : str
    bins : int

    Returns
    -------
    str
    """
    fig, axes = _figure(len(panels), size=(4.2, 4.0))
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    for ax, (label, data) in zip(axes, panels.items()):
        phi, psi = np.asarray(data[0]), np.asarray(data[1])
        w = np.asarray(data[2]) if len(data) > 2 and data[2] is not None else None
        h = np.histogram2d(phi, psi, bins=[edges, edges], weights=w)[0]
        with np.errstate(divide="ignore"):
            f = -np.log(h / h.sum())
        f -= np.nanmin(f[np.isfinite(f)]) if np.isfinite(f).any() else 0.0
        im = ax.imshow(np.where(np.isfinite(f), f, np.nan).T, origin="lower",
                       extent=[-180, 180, -180, 180], vmin=0, vmax=8, cmap="viridis")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("phi (deg)")
        ax.set_ylabel("psi (deg)")
    fig.colorbar(im, ax=axes, label="free energy (kT)", shrink=0.8)
    return _save(fig, path)


def plot_energy_scatter(classical_kt, learned_kt, path: str, fit: dict | None = None,
                        ylabel: str = "learned E_theta(x, t_min) (kT)") -> str:
    """Learned vs reduced classical energy, with the OLS line if ``fit`` is given.

    Parameters
    ----------
    classical_kt, learned_kt : array-like, shape (n,)
        ``u/kT`` and the learned energy (kT).
    fit : dict, optional
        :func:`openmm_diffenergy.compare.correlation` output.

    Returns
    -------
    str
    """
    x, y = np.asarray(classical_kt, float), np.asarray(learned_kt, float)
    ok = np.isfinite(x) & np.isfinite(y)
    fig, (ax,) = _figure()
    ax.scatter(x[ok], y[ok], s=6, alpha=0.6)
    if fit:
        xs = np.linspace(x[ok].min(), x[ok].max(), 2)
        ax.plot(xs, fit["intercept"] + fit["slope"] * xs, "r-", lw=1,
                label=f"slope {fit['slope']:.2f}, Spearman {fit['spearman']:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("classical u/kT")
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def plot_funnel(rmsd_nm, energies: dict, path: str) -> str:
    """Energy-funnel plot: each energy (shifted to min 0) against RMSD (Angstrom).

    Parameters
    ----------
    rmsd_nm : array-like, shape (n,)
    energies : dict of str -> array-like (n,)
        Label -> energy in kT (e.g. learned, classical u/kT).
    path : str

    Returns
    -------
    str
    """
    r = 10.0 * np.asarray(rmsd_nm, float)
    fig, axes = _figure(len(energies), size=(4.2, 4.0))
    for ax, (label, e) in zip(axes, energies.items()):
        e = np.asarray(e, float)
        ok = np.isfinite(e)
        ax.scatter(r[ok], e[ok] - e[ok].min(), s=6, alpha=0.6)
        best = int(np.argmin(np.where(ok, e, np.inf)))
        ax.scatter([r[best]], [e[best] - e[ok].min()], s=40, c="r", marker="*",
                   label="lowest energy")
        ax.set_xlabel("RMSD to reference (A)")
        ax.set_ylabel(f"{label} (kT, min 0)")
        ax.set_yscale("symlog")
        ax.legend(fontsize=8)
    return _save(fig, path)
