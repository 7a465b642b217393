"""MoE -> dense (or smaller MoE) distillation through the ordinary trainer.

loss = alpha * LM loss + (1 - alpha) * T^2 * KL(teacher_T || student_T) (+ the student's
own aux losses, if it is an MoE), where x_T = softmax(logits / T) and the KL is averaged
over target tokens. T^2 keeps the soft-target gradients' scale independent of T
(Hinton et al. 2015); at T = 1 and alpha = 0 the loss is the KL itself. The teacher's
logits are computed in the same step, under no_grad, never written to disk. The student
trains with the teacher's tokenizer (a checkpoint student with another one is refused),
and resume, metrics and checkpoints are the trainer's.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.dataset import tokenizer_hash
from ..errors import ConfigError
from ..model import ModelOutput, Transformer
from ..run_config import RunConfig, apply_overrides, config_from_dict, load_config, read_config
from ..store.checkpoint import resolve_checkpoint
from ..store.resume import refuse_changed_settings
from ..store.run import load_run, load_tokenizer
from ..train import train

DISTILL_FILE = "distill.json"  # the teacher and loss settings, compared on --resume


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over positions with a target (!= -100) of KL(softmax(t/T) || softmax(s/T)), in nats."""
    keep = targets != -100
    s = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def attach_teacher(student: Transformer, teacher: Transformer, temperature: float, alpha: float) -> None:
    """Make `student`'s forward return the distillation loss as `loss` (its LM loss stays
    `lm_loss`, so evaluation is unchanged). The teacher is held outside the module tree:
    it is neither trained nor saved with the student."""
    teacher.eval().requires_grad_(False)
    plain_forward = student.forward

    def forward(self, tokens, targets=None, mask=None):
        out: ModelOutput = plain_forward(tokens, targets, mask)
        if targets is None or not self.training or out.loss is None or out.lm_loss is None:
            return out
        with torch.no_grad():
            t_logits = teacher(tokens).logits
        kl = distill_kl(out.logits, t_logits, targets, temperature)
        aux = out.loss - out.lm_loss
        out.loss = alpha * out.lm_loss + (1 - alpha) * temperature**2 * kl + aux
        return out

    student.forward = types.MethodType(forward, student)  # type: ignore[method-assign]  # per instance, on purpose


def distill(
    teacher_src: str,
    student: str,
    data: str,
    out: str | Path,
    *,
    steps: int | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
):
    """Train `student` (a recipe or YAML, or a run/checkpoint to start from) on `data` with
    the teacher run's soft targets into run folder `out`; returns the TrainResult."""

    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature: expected a positive number, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"--alpha: expected a number in [0, 1] (the LM loss's weight), got {alpha}")
    t = load_run(teacher_src, device="cpu")
    t_tok = t.checkpoint.parent.parent / "tokenizer.json"
    if not t_tok.is_file():
        raise ConfigError(f"{teacher_src}: the teacher's run folder has no tokenizer.json")
    init = None
    if Path(student).is_dir():  # a run or checkpoint: its weights, config and tokenizer
        init = str(resolve_checkpoint(student))
        s_run = Path(init).parent.parent
        s_tok = s_run / "tokenizer.json"
        if not s_tok.is_file() or tokenizer_hash(load_tokenizer(s_tok)) != tokenizer_hash(load_tokenizer(t_tok)):
            raise ConfigError(
                f"--student {student}: its tokenizer is not the teacher's ({t_tok}); a student must "
                "read the same token ids as its teacher"
            )
        cfg: RunConfig = config_from_dict(
            apply_overrides(read_config(s_run / "config.yaml").to_dict(), overrides or [])
        )
    else:
        cfg = load_config(student, overrides)
    if cfg.model.vocab_size != t.cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: the student's {cfg.model.vocab_size} differs from the teacher's "
            f"{t.cfg.model.vocab_size}; the KL compares distributions over the same vocabulary"
        )
    cfg = copy.deepcopy(cfg)
    cfg.name = f"{cfg.name}-distilled"
    cfg.data.source, cfg.data.tokenizer = data, str(t_tok)
    if steps is not None:
        cfg.train.steps = steps
    cfg.validate()
    settings = {"teacher": str(t.checkpoint), "temperature": temperature, "alpha": alpha}
    if resume and (Path(out) / DISTILL_FILE).is_file():
        refuse_changed_settings(
            json.loads((Path(out) / DISTILL_FILE).read_text()),
            settings,
            Path(out) / DISTILL_FILE,
            noun="run",
            may_change="the same teacher checkpoint, --temperature and --alpha; only --steps may change",
        )
    print(
        f"distilling {t.checkpoint} into {cfg.name}: loss = {alpha} x LM + {1 - alpha} x {temperature}^2 x KL(T="
        f"{temperature})",
        file=sys.stderr,
    )
    return train(
        cfg,
        out,
        resume=resume,
        overwrite=overwrite,
        init=init,
        quiet=quiet,
        prepare_model=lambda m: attach_teacher(m, t.model, temperature, alpha),
        protect=[teacher_src, t.checkpoint.parent.parent, student],
        records={DISTILL_FILE: settings},
    )
