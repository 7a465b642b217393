"""`optim.lr=auto`: a peak learning rate from a power law in the parameter count, either
MM1's published rule or one fitted by `moelab lr-fit` (moelab.analysis.studies.lr_scaling writes
those fits; this module only evaluates them, so the trainer needs nothing from analysis).

MM1 (McKinney et al. 2024): log(eta*) = a * log(N) + b over non-embedding parameters,
a = -0.4214, b = -0.5535.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ConfigError
from ..run_config import RunConfig

MM1_A, MM1_B = -0.4214, -0.5535


def mm1_lr(n_params: float) -> float:
    """MM1's optimal peak LR for N non-embedding parameters."""
    return math.exp(MM1_A * math.log(n_params) + MM1_B)


def predict_lr(fit: dict, n_params: float) -> float:
    """exp(a * log(n_params) + b): the learning rate a fit predicts for a model of `n_params`."""
    return math.exp(fit["a"] * math.log(n_params) + fit["b"])


def resolve_auto_lr(cfg: RunConfig) -> float:
    """`optim.lr=auto`: the fitted rule in `optim.lr_fit` (a fit.json) or MM1's rule,
    evaluated at the model's parameter count (non-embedding unless the fit says else)."""
    counts = cfg.model.param_counts()
    if cfg.optim.lr_fit:
        path = Path(cfg.optim.lr_fit)
        if not path.is_file():
            raise ConfigError(f"optim.lr_fit: {path} does not exist (expected a fit.json from `moelab lr-fit`)")
        try:
            fit = json.loads(path.read_text())
            return predict_lr(fit["fit"], counts[fit["count"]])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"optim.lr_fit: {path} is not a fit.json from `moelab lr-fit` ({e!r})") from None
    return mm1_lr(counts["non_embedding"])
