"""Loss laws fitted the Chinchilla way (Hoffmann et al. 2022, approach 3): Huber loss on
log L, from a grid of initialisations, each refined by Levenberg-Marquardt on iteratively
reweighted least squares; intervals by refitting runs resampled with replacement.

Two forms: L(N, D) = E + A / N^alpha + B / D^beta, and Krajewski et al.'s (2024) fine-grained
MoE law L(N, D, G) = E + (A + g / G^gamma) / N^alpha + B / D^beta, with G the granularity
(the dense FFN's width over an expert's). N is a model's active non-embedding parameters, D
its training tokens. An exponent the grid cannot determine (fewer than three sizes, budgets
or granularities) is fixed at its prior (Chinchilla's alpha 0.34 and beta 0.28, Krajewski's
gamma 0.58) and the fit says so; fewer runs than free parameters + 1, or a fit that ends
against an exponent's bound, is refused with one line.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from ....errors import ConfigError

PRIOR = {"alpha": 0.34, "beta": 0.28, "gamma": 0.58}  # Hoffmann et al. 2022 approach 3; Krajewski et al. 2024
# an exponent that ends at a bound did not converge; gamma may be negative (finer experts can be worse)
BOUNDS = {"alpha": (1e-3, 3.0), "beta": (1e-3, 3.0), "gamma": (-3.0, 3.0)}
HUBER_DELTA = 1e-3
WHAT = {"alpha": "model sizes", "beta": "token budgets", "gamma": "granularities"}
FALLS = {"alpha": "size", "beta": "tokens", "gamma": "granularity"}


@dataclass(frozen=True)
class Form:
    """A law as a sum of exp-terms in log space: each term is exp(theta[coef] - sum theta[p] * feature[f]) over its
    (exponent p, feature f) pairs; features are log N, log D and log G."""

    names: tuple[str, ...]  # the fitted coordinates: log E, log A, alpha, log B, beta[, log g, gamma]
    terms: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]

    @property
    def exponents(self) -> dict[str, int]:
        """The exponents' coordinates by name."""
        return {k: i for i, k in enumerate(self.names) if k in BOUNDS}


CHINCHILLA = Form(("e", "a", "alpha", "b", "beta"), ((0, ()), (1, ((2, 0),)), (3, ((4, 1),))))
GRANULAR = Form(CHINCHILLA.names + ("g", "gamma"), CHINCHILLA.terms + ((5, ((2, 0), (6, 2))),))


@dataclass
class Law:
    """One fitted law; `fixed` names the exponents set from the prior (with the reason). `g` and `gamma` are set
    for the granular form only."""

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
    g: float | None = None
    gamma: float | None = None

    @property
    def form(self) -> Form:
        """The law's form: granular when it has a granularity term."""
        return CHINCHILLA if self.g is None else GRANULAR

    def loss(self, n, d, granularity=None):
        """L(N, D) - or L(N, D, G) for a granular law - element-wise."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.size_coef(granularity) / n**self.alpha + self.B / d**self.beta

    def size_coef(self, granularity=None):
        """The size term's coefficient: A, or A + g / G^gamma for a granular law (which needs G)."""
        if self.g is None:
            return self.A
        if granularity is None:
            raise ValueError("a granular law needs the granularity G")
        return self.A + self.g / np.asarray(granularity, dtype=float) ** self.gamma

    def at(self, granularity: float) -> Law:
        """The law at one granularity: L(N, D) with A + g / G^gamma as its size coefficient."""
        a = float(self.size_coef(granularity))
        coords = (self.theta[0], math.log(a), self.alpha, self.theta[3], self.beta)
        return Law(self.E, a, self.alpha, self.B, self.beta, dict(self.fixed), self.huber, self.rms_log, self.n_runs,
                   tuple(float(c) for c in coords))  # fmt: skip

    @property
    def theta(self) -> np.ndarray:
        """The fitted coordinates: (log E, log A, alpha, log B, beta[, log g, gamma])."""
        if self.coords:
            return np.array(self.coords)
        t = [math.log(self.E), math.log(self.A), self.alpha, math.log(self.B), self.beta]
        return np.array(t if self.g is None else [*t, math.log(self.g), self.gamma])

    def as_dict(self) -> dict:
        """The law as JSON (g and gamma only for the granular form)."""
        keys = ("E", "A", "alpha", "B", "beta", "fixed", "huber", "rms_log", "n_runs")
        return {k: getattr(self, k) for k in keys + (() if self.g is None else ("g", "gamma"))}


def _residuals(theta, feats, l_obs, form: Form):
    """Residuals of log L and their Jacobian, batched: theta (K, P), feats (K, n, F), l_obs (K, n)."""
    terms = []
    for c, pairs in form.terms:
        t = np.broadcast_to(theta[:, c : c + 1], l_obs.shape)
        for p, f in pairs:
            t = t - theta[:, p : p + 1] * feats[..., f]
        terms.append(t)
    stacked = np.stack(terms, axis=-1)  # (K, n, terms)
    top = stacked.max(-1, keepdims=True)
    w = np.exp(stacked - top)
    s = w / w.sum(-1, keepdims=True)
    r = (top[..., 0] + np.log(w.sum(-1))) - l_obs
    jac = np.zeros((*l_obs.shape, len(form.names)))
    for k, (c, pairs) in enumerate(form.terms):
        jac[..., c] += s[..., k]
        for p, f in pairs:
            jac[..., p] -= feats[..., f] * s[..., k]
    return r, jac


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _solve(theta0, feats, l_obs, free, delta, form: Form, iters=300):
    """Levenberg-Marquardt on IRLS-weighted residuals for every row of theta0 at once; returns
    (theta, objective, gradient norm) per row."""
    theta = theta0.copy()
    lam = np.full(len(theta), 1e-2)
    fixed = ~free
    eye = np.eye(len(form.names))
    r, jac = _residuals(theta, feats, l_obs, form)
    f = _huber(r, delta).sum(-1)
    for _ in range(iters):
        wts = np.where(np.abs(r) <= delta, 1.0, delta / np.maximum(np.abs(r), 1e-30))
        jac = jac * free
        g = np.einsum("knp,kn->kp", jac, wts * r)
        h = np.einsum("knp,kn,knq->kpq", jac, wts, jac)
        diag = np.einsum("kpp->kp", h)
        h = h + (lam[:, None] * (diag + 1e-9))[:, :, None] * eye + eye * fixed
        step = -np.linalg.solve(h, g[..., None])[..., 0]
        trial = theta + step
        for name, p in form.exponents.items():
            trial[:, p] = np.clip(trial[:, p], *BOUNDS[name])
        r2, jac2 = _residuals(trial, feats, l_obs, form)
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


def _features(n, d, granularity) -> np.ndarray:
    cols = [np.log(n), np.log(d)] + ([] if granularity is None else [np.log(granularity)])
    return np.stack(cols, axis=-1)


def _distinct(col) -> int:
    return len(set(np.round(col, 9)))


def _design(feats: np.ndarray, form: Form, where: str) -> dict[str, str]:
    """The exponents fixed at the prior because the grid cannot determine them."""
    fixed = {}
    for name, col in (("alpha", 0), ("beta", 1), ("gamma", 2)):
        if name in form.names and _distinct(feats[:, col]) < 3:
            prior = "Krajewski et al." if name == "gamma" else "Chinchilla"
            fixed[name] = f"{where}: fewer than 3 {WHAT[name]}; {name} fixed at {PRIOR[name]} ({prior})"
    return fixed


def _init_grid(fixed: dict[str, str], form: Form) -> np.ndarray:
    es, ab = (-1.0, 0.0, 0.5, 1.5), (0.0, 6.0, 12.0)
    al = (PRIOR["alpha"],) if "alpha" in fixed else (0.1, 0.4, 1.0)
    be = (PRIOR["beta"],) if "beta" in fixed else (0.1, 0.4, 1.0)
    grid = np.array(list(itertools.product(es, ab, al, ab, be)), dtype=float)
    if form is GRANULAR:  # g at a tenth of A, its exponent over its range; data-driven starts come from the nested fit
        gammas = (PRIOR["gamma"],) if "gamma" in fixed else (-0.5, 0.5, 1.5)
        grid = np.array([[*t, t[1] - 2.3, gm] for t in grid for gm in gammas])
    return grid


def _granular_starts(feats, l_obs, free, delta, fixed) -> np.ndarray:
    """Starts for the granular law from the best fits of the law without G (which it nests: g = 0): each split
    between A and g / G^gamma at the grid's middle granularity, for a few gammas."""
    init = _init_grid(fixed, CHINCHILLA)
    theta, f, _ = _solve(init, np.broadcast_to(feats[:, :2], (len(init), *feats[:, :2].shape)),
                         np.broadcast_to(l_obs, (len(init), len(l_obs))), free[:5], delta, CHINCHILLA)  # fmt: skip
    best = theta[np.argsort(np.nan_to_num(f, nan=np.inf))[:8]]
    mid = float(np.median(feats[:, 2]))
    gammas = (PRIOR["gamma"],) if "gamma" in fixed else (-0.5, 0.5, 1.5)
    starts = [[t[0], t[1] + math.log(1 - share), t[2], t[3], t[4], t[1] + math.log(share) + gm * mid, gm]
              for t in best for share in (0.2, 0.8) for gm in gammas]  # fmt: skip
    return np.array(starts, dtype=float)


def _at_bound(theta, form: Form, fixed) -> str | None:
    for name, p in form.exponents.items():
        lo, hi = BOUNDS[name]
        if name not in fixed and (theta[p] <= lo + 0.01 * abs(lo) or theta[p] >= hi - 0.01 * abs(hi)):
            return name
    return None


def fit_law(n, d, loss, *, granularity=None, where: str = "scaling fit", delta: float = HUBER_DELTA) -> Law:
    """Fit L(N, D) to runs (parameters `n`, tokens `d`, final held-out `loss`), or L(N, D, G) when each run's
    `granularity` is given (at least 2 distinct). ConfigError, naming `where`, when the runs are too few or the
    fit does not converge."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    gran = None if granularity is None else np.asarray(granularity, dtype=float)
    ok = np.isfinite(loss) & (loss > 0)
    n, d, loss = n[ok], d[ok], loss[ok]
    gran = None if gran is None else gran[ok]
    if _distinct(np.log(n)) < 2 or _distinct(np.log(d)) < 2:
        raise ConfigError(f"{where}: needs at least 2 model sizes and 2 token budgets with a finite loss")
    if gran is not None and _distinct(np.log(gran)) < 2:
        raise ConfigError(f"{where}: a granular law needs at least 2 granularities with a finite loss")
    form = CHINCHILLA if gran is None else GRANULAR
    feats = _features(n, d, gran)
    fixed = _design(feats, form, where)
    free = np.array([k not in fixed for k in form.names])
    if len(n) < free.sum() + 1:
        raise ConfigError(
            f"{where}: {len(n)} runs for {free.sum()} free parameters of the law: needs at least {free.sum() + 1} "
            "(more sizes, budgets or seeds)"
        )
    init = _init_grid(fixed, form) if form is CHINCHILLA else _granular_starts(feats, np.log(loss), free, delta, fixed)
    theta, f, grad = _solve(init, np.broadcast_to(feats, (len(init), *feats.shape)),
                            np.broadcast_to(np.log(loss), (len(init), len(n))), free, delta, form)  # fmt: skip
    i = int(np.argmin(f))
    law = _law(theta[i], f[i], feats, loss, fixed, form)
    bound = _at_bound(theta[i], form, fixed)
    if bound:
        raise ConfigError(
            f"{where}: the fit did not converge ({bound} ended at its bound {theta[i][form.exponents[bound]]:.3g}: "
            f"the losses do not fall as a power of {FALLS[bound]} over this grid; widen it or train longer)"
        )
    if not np.isfinite(f[i]) or grad[i] > 1e-3 * max(1.0, math.sqrt(len(n))):
        raise ConfigError(f"{where}: the fit did not converge (gradient {grad[i]:.2g} at the best start)")
    vanished = _vanished(law, feats, loss)
    if vanished:
        raise ConfigError(
            f"{where}: the fit did not converge (the {vanished} term vanished: the losses do not fall with "
            f"{vanished} over this grid; widen it, train longer or add seeds)"
        )
    return law


def _vanished(law: Law, feats, loss) -> str | None:
    """'size' or 'tokens' when that term of the law is nothing beside the loss over the grid
    (a degenerate fit: its exponent or coefficient cannot be read from these runs)."""
    scale = float(np.median(loss))
    n, d = np.exp(feats[:, 0]), np.exp(feats[:, 1])
    coef = law.size_coef(None if law.g is None else np.exp(feats[:, 2]))
    if not (np.all(coef > 0) and float(np.max(coef / n**law.alpha)) > 1e-4 * scale):
        return "size"
    if not (law.B > 0 and float(np.max(law.B / d**law.beta)) > 1e-4 * scale):
        return "tokens"
    return None


def _law(theta, f, feats, loss, fixed, form: Form) -> Law:
    law = Law(
        E=float(math.exp(theta[0])),
        A=float(math.exp(theta[1])),
        alpha=float(theta[2]),
        B=float(math.exp(theta[3])),
        beta=float(theta[4]),
        fixed=dict(fixed),
        huber=float(f),
        n_runs=len(loss),
        coords=tuple(float(v) for v in theta),
    )
    if form is GRANULAR:
        law.g, law.gamma = float(math.exp(theta[5])), float(theta[6])
    gran = None if law.g is None else np.exp(feats[:, 2])
    fitted = law.loss(np.exp(feats[:, 0]), np.exp(feats[:, 1]), gran)
    law.rms_log = float(np.sqrt(np.mean((np.log(fitted) - np.log(loss)) ** 2)))
    return law


def bootstrap(
    n, d, loss, law: Law, *, granularity=None, samples: int = 200, seed: int = 0, delta: float = HUBER_DELTA
) -> list[Law]:
    """Refits of `law` on the runs resampled with replacement (each started from the full fit
    and 7 other starts); resamples that lose a size, a budget or a granularity, end at a bound
    or lose a term are dropped."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    ok = np.isfinite(loss) & (loss > 0)
    gran = None if granularity is None else np.asarray(granularity, dtype=float)[ok]
    feats = _features(n[ok], d[ok], gran)
    loss = loss[ok]
    form = law.form
    rng = np.random.default_rng(seed)
    free = np.array([k not in law.fixed for k in form.names])
    grid = _init_grid(law.fixed, form)
    starts = np.vstack([law.theta, grid[rng.choice(len(grid), 7, replace=False)]])
    idx = rng.integers(0, len(loss), (samples, len(loss)))
    counts = [_distinct(feats[:, c]) for c in range(feats.shape[1])]
    keep = [i for i in range(samples) if all(_distinct(feats[idx[i], c]) >= counts[c] for c in range(len(counts)))]
    if not keep:
        return []
    idx = idx[keep]
    k = len(starts)
    rows = np.repeat(idx, k, axis=0)  # (S * k, n)
    theta0 = np.tile(starts, (len(idx), 1))
    theta, f, _ = _solve(theta0, feats[rows], np.log(loss)[rows], free, delta, form)
    best = f.reshape(len(idx), k).argmin(1)
    laws = []
    for s, j in enumerate(best):
        t = theta[s * k + j]
        if _at_bound(t, form, law.fixed):
            continue
        sel = idx[s]
        fit = _law(t, f[s * k + j], feats[sel], loss[sel], law.fixed, form)
        if _vanished(fit, feats[sel], loss[sel]) is None:
            laws.append(fit)
    return laws


def interval(values, level: float = 0.95) -> list[float]:
    """The central `level` percentile interval of bootstrap values (finite ones)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    lo = (1 - level) / 2 * 100
    return [float(np.percentile(v, lo)), float(np.percentile(v, 100 - lo))]
