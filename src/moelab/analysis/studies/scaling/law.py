"""Loss laws L(N, D) = E + A / N^alpha + B / D^beta fitted the Chinchilla way (Hoffmann et
al. 2022, approach 3): Huber loss on log L, from a grid of initialisations, each refined by
Levenberg-Marquardt on iteratively reweighted least squares; intervals by refitting runs
resampled with replacement.

N is a model's active non-embedding parameters, D its training tokens. An exponent the grid
cannot determine (fewer than three sizes, or three budgets) is fixed at Chinchilla's
(alpha 0.34, beta 0.28) and the fit says so; fewer runs than free parameters + 1, or a fit
that ends against an exponent's bound, is refused with one line.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ....errors import ConfigError

NAMES = ("e", "a", "alpha", "b", "beta")  # E = exp(e), A = exp(a), B = exp(b)
PRIOR = {"alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, approach 3
BOUNDS = (1e-3, 3.0)  # an exponent that ends here did not converge
HUBER_DELTA = 1e-3


@dataclass
class Law:
    """One fitted law; `fixed` names the exponents set from the prior (with the reason)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    fixed: dict[str, str] = field(default_factory=dict)
    huber: float = 0.0  # the objective at the optimum
    rms_log: float = 0.0  # root-mean-square residual of log L
    n_runs: int = 0
    # the fit's own coordinates: E = exp(log E) underflows to 0 where a grid shows no floor, and log 0 is no start
    coords: tuple[float, ...] = field(default=(), repr=False)

    def loss(self, n, d):
        """L(N, D), element-wise."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def theta(self) -> np.ndarray:
        """(log E, log A, alpha, log B, beta): the fitted coordinates."""
        if self.coords:
            return np.array(self.coords)
        return np.array([math.log(self.E), math.log(self.A), self.alpha, math.log(self.B), self.beta])

    def as_dict(self) -> dict:
        """The law as JSON."""
        return {k: getattr(self, k) for k in ("E", "A", "alpha", "B", "beta", "fixed", "huber", "rms_log", "n_runs")}


def _residuals(theta, x, y, l_obs):
    """Residuals of log L and their Jacobian, batched: theta (K, 5), x y l (K, n)."""
    e, a, al, b, be = (theta[:, i : i + 1] for i in range(5))
    terms = np.stack([a - al * x, b - be * y, np.broadcast_to(e, x.shape)], axis=-1)  # (K, n, 3)
    top = terms.max(-1, keepdims=True)
    w = np.exp(terms - top)
    s = w / w.sum(-1, keepdims=True)
    r = (top[..., 0] + np.log(w.sum(-1))) - l_obs
    jac = np.stack([s[..., 2], s[..., 0], -x * s[..., 0], s[..., 1], -y * s[..., 1]], axis=-1)  # (K, n, 5)
    return r, jac


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _solve(theta0, x, y, l_obs, free, delta, iters=300):
    """Levenberg-Marquardt on IRLS-weighted residuals for every row of theta0 at once; returns
    (theta, objective, gradient norm) per row."""
    theta = theta0.copy()
    lam = np.full(len(theta), 1e-2)
    fixed = ~free
    r, jac = _residuals(theta, x, y, l_obs)
    f = _huber(r, delta).sum(-1)
    for _ in range(iters):
        wts = np.where(np.abs(r) <= delta, 1.0, delta / np.maximum(np.abs(r), 1e-30))
        jac = jac * free
        g = np.einsum("knp,kn->kp", jac, wts * r)
        h = np.einsum("knp,kn,knq->kpq", jac, wts, jac)
        diag = np.einsum("kpp->kp", h)
        h = h + (lam[:, None] * (diag + 1e-9))[:, :, None] * np.eye(5) + np.eye(5) * fixed
        step = -np.linalg.solve(h, g[..., None])[..., 0]
        trial = theta + step
        trial[:, 2] = np.clip(trial[:, 2], *BOUNDS)
        trial[:, 4] = np.clip(trial[:, 4], *BOUNDS)
        r2, jac2 = _residuals(trial, x, y, l_obs)
        f2 = _huber(r2, delta).sum(-1)
        better = f2 < f
        theta = np.where(better[:, None], trial, theta)
        r = np.where(better[:, None], r2, r)
        jac = np.where(better[:, None, None], jac2, jac)
        done = np.abs(f - f2) <= 1e-14 * np.maximum(f, 1e-30)
        f = np.where(better, f2, f)
        lam = np.where(better, lam / 3, np.minimum(lam * 3, 1e12))
        if np.all(done | (lam >= 1e12)):
            break
    wts = np.where(np.abs(r) <= delta, 1.0, delta / np.maximum(np.abs(r), 1e-30))
    grad = np.linalg.norm(np.einsum("knp,kn->kp", jac * free, wts * r), axis=-1)
    return theta, f, grad


def _design(n, d, where: str) -> dict[str, str]:
    """The exponents fixed at the prior because the grid cannot determine them."""
    fixed = {}
    if len(set(np.round(np.log(n), 9))) < 3:
        fixed["alpha"] = f"{where}: fewer than 3 model sizes; alpha fixed at {PRIOR['alpha']} (Chinchilla)"
    if len(set(np.round(np.log(d), 9))) < 3:
        fixed["beta"] = f"{where}: fewer than 3 token budgets; beta fixed at {PRIOR['beta']} (Chinchilla)"
    return fixed


def _init_grid(fixed: dict[str, str]) -> np.ndarray:
    es, ab = (-1.0, 0.0, 0.5, 1.5), (0.0, 6.0, 12.0)
    al = (PRIOR["alpha"],) if "alpha" in fixed else (0.1, 0.4, 1.0)
    be = (PRIOR["beta"],) if "beta" in fixed else (0.1, 0.4, 1.0)
    return np.array(list(itertools.product(es, ab, al, ab, be)), dtype=float)


def fit_law(n, d, loss, *, where: str = "scaling fit", delta: float = HUBER_DELTA) -> Law:
    """Fit L(N, D) to runs (parameters `n`, tokens `d`, final held-out `loss`). ConfigError,
    naming `where`, when the runs are too few or the fit does not converge."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    ok = np.isfinite(loss) & (loss > 0)
    n, d, loss = n[ok], d[ok], loss[ok]
    if len(set(np.round(np.log(n), 9))) < 2 or len(set(np.round(np.log(d), 9))) < 2:
        raise ConfigError(f"{where}: needs at least 2 model sizes and 2 token budgets with a finite loss")
    fixed = _design(n, d, where)
    free = np.array([k not in fixed for k in NAMES])
    if len(n) < free.sum() + 1:
        raise ConfigError(
            f"{where}: {len(n)} runs for {free.sum()} free parameters of the law: needs at least {free.sum() + 1} "
            "(more sizes, budgets or seeds)"
        )
    init = _init_grid(fixed)
    x, y, l_obs = (np.broadcast_to(v, (len(init), len(n))) for v in (np.log(n), np.log(d), np.log(loss)))
    theta, f, grad = _solve(init, x, y, l_obs, free, delta)
    i = int(np.argmin(f))
    law = _law(theta[i], f[i], n, d, loss, fixed)
    for name in ("alpha", "beta"):
        value = getattr(law, name)
        if name not in fixed and (value <= BOUNDS[0] * 1.01 or value >= BOUNDS[1] * 0.99):
            raise ConfigError(
                f"{where}: the fit did not converge ({name} ended at its bound {value:.3g}: the losses do not fall "
                f"as a power of {'size' if name == 'alpha' else 'tokens'} over this grid; widen it or train longer)"
            )
    if not np.isfinite(f[i]) or grad[i] > 1e-3 * max(1.0, math.sqrt(len(n))):
        raise ConfigError(f"{where}: the fit did not converge (gradient {grad[i]:.2g} at the best start)")
    vanished = _vanished(law, n, d, loss)
    if vanished:
        raise ConfigError(
            f"{where}: the fit did not converge (the {vanished} term vanished: the losses do not fall with "
            f"{vanished} over this grid; widen it, train longer or add seeds)"
        )
    return law


def _vanished(law: Law, n, d, loss) -> str | None:
    """'size' or 'tokens' when that term of the law is nothing beside the loss over the grid
    (a degenerate fit: its exponent or coefficient cannot be read from these runs)."""
    scale = float(np.median(loss))
    if not (law.A > 0 and float(np.max(law.A / n**law.alpha)) > 1e-4 * scale):
        return "size"
    if not (law.B > 0 and float(np.max(law.B / d**law.beta)) > 1e-4 * scale):
        return "tokens"
    return None


def _law(theta, f, n, d, loss, fixed) -> Law:
    law = Law(
        E=float(math.exp(theta[0])),
        A=float(math.exp(theta[1])),
        alpha=float(theta[2]),
        B=float(math.exp(theta[3])),
        beta=float(theta[4]),
        fixed=dict(fixed),
        huber=float(f),
        n_runs=len(n),
        coords=tuple(float(v) for v in theta),
    )
    law.rms_log = float(np.sqrt(np.mean((np.log(law.loss(n, d)) - np.log(loss)) ** 2)))
    return law


def bootstrap(n, d, loss, law: Law, *, samples: int = 200, seed: int = 0, delta: float = HUBER_DELTA) -> list[Law]:
    """Refits of `law` on the runs resampled with replacement (each started from the full fit
    and 7 other starts); resamples that lose a size or a budget, end at a bound or lose a
    term are dropped."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    ok = np.isfinite(loss) & (loss > 0)
    n, d, loss = n[ok], d[ok], loss[ok]
    rng = np.random.default_rng(seed)
    free = np.array([k not in law.fixed for k in NAMES])
    grid = _init_grid(law.fixed)
    starts = np.vstack([law.theta, grid[rng.choice(len(grid), 7, replace=False)]])
    idx = rng.integers(0, len(n), (samples, len(n)))
    keep = [i for i in range(samples) if len(set(n[idx[i]])) >= len(set(n)) and len(set(d[idx[i]])) >= len(set(d))]
    if not keep:
        return []
    idx = idx[keep]
    k = len(starts)
    rows = np.repeat(idx, k, axis=0)  # (S * k, n)
    theta0 = np.tile(starts, (len(idx), 1))
    theta, f, _ = _solve(theta0, np.log(n)[rows], np.log(d)[rows], np.log(loss)[rows], free, delta)
    best = f.reshape(len(idx), k).argmin(1)
    laws = []
    for s, j in enumerate(best):
        t = theta[s * k + j]
        if any(t[p] <= BOUNDS[0] * 1.01 or t[p] >= BOUNDS[1] * 0.99 for p, name in ((2, "alpha"), (4, "beta"))
               if name not in law.fixed):  # fmt: skip
            continue
        sel = idx[s]
        fit = _law(t, f[s * k + j], n[sel], d[sel], loss[sel], law.fixed)
        if _vanished(fit, n[sel], d[sel], loss[sel]) is None:
            laws.append(fit)
    return laws


def interval(values, level: float = 0.95) -> list[float]:
    """The central `level` percentile interval of bootstrap values (finite ones)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    lo = (1 - level) / 2 * 100
    return [float(np.percentile(v, lo)), float(np.percentile(v, 100 - lo))]
