"""What `moelab memory` reports for a recipe or a run, planned and (on request) measured: the model and its dense
twin on a data-parallel setup, the busiest expert-parallel rank under a run's own expert loads, each pipeline rank
with the schedule's bubble, and a quantized checkpoint's resident weights. The command only parses and prints; the
rules of what can be planned together live here, where an API user reaches them too."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ...config import ConfigError
from ...run_config import RunConfig
from .measure import plan_and_measure
from .pipeline_measure import measure_pipeline
from .pipeline_plan import plan_stages
from .plan import MemoryPlan
from .setup import MemorySetup, PipelineShape
from .skew import skew_report


@dataclass
class MemoryReport:
    """Plans (the model, then its dense twin for an MoE), what was measured of them by name, and `extra`:
    "skewed_activations" (a run's loads), "pipeline" (per rank, with the bubble), "quantized_weight_bytes"."""

    cfg: RunConfig
    setup: MemorySetup
    plans: list[MemoryPlan]
    measured: dict[str, dict]
    extra: dict = field(default_factory=dict)

    def to_json(self) -> list[dict]:
        """One dict per plan (with its measurement); the first also carries `extra` (`moelab memory --json`)."""
        out = [dict(p.to_json(), **({"measured": self.measured[p.name]} if p.name in self.measured else {}))
               for p in self.plans]  # fmt: skip
        return [{**out[0], **self.extra}, *out[1:]]


def memory_report(
    cfg: RunConfig,
    setup: MemorySetup,
    *,
    run: Path | None = None,
    measure: bool = False,
    pipeline: PipelineShape | None = None,
) -> MemoryReport:
    """The report for `cfg` (read from the run folder `run`, whose measured expert loads then give the busiest
    expert-parallel rank) trained as `setup` says (its seq_len None: the config's data.seq_len), and per pipeline rank
    of `pipeline`; measured on this machine where `measure` (a run with its own weights and text; a pipeline in its
    real processes). ConfigError, naming the setting, for what cannot be planned together."""
    if setup.seq_len is None:
        setup = replace(setup, seq_len=cfg.data.seq_len)
    assert setup.seq_len is not None
    if setup.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"--seq-len: expected at most model.max_seq_len={cfg.model.max_seq_len}, got {setup.seq_len}")
    # a run is measured with its own weights and text, below; a pipeline by its ranks
    plans, measured = plan_and_measure(cfg, setup, measure=measure and run is None and pipeline is None)
    report = MemoryReport(cfg, setup, plans, measured)
    if run is not None and cfg.model.moe is not None:
        uniform = plans[0].bytes["activations"]
        report.extra["skewed_activations"] = skew_report(run, cfg, uniform, setup, measure=measure)
    if pipeline is not None:
        # the per-rank plan is of pipeline ranks alone: a silent plan that ignored the other axes would mislead
        if (setup.devices, setup.zero) != (1, 0):
            raise ConfigError(
                "--devices/--zero: expected 1 and 0 with --pipeline (the pipeline plan does not divide its ranks "
                f"further yet), got {(setup.devices, setup.zero)!r}"
            )
        pipeline.check(cfg.model)
        report.extra["pipeline"] = {
            "pipeline": pipeline.pipeline,
            "micro_batches": pipeline.micro_batches,
            "schedule": pipeline.schedule,
            "virtual_stages": pipeline.virtual,
            "bubble": pipeline.bubble(),
            "ranks": plan_stages(cfg.model, pipeline, optim=cfg.optim),
        }
        if measure:
            if setup.dtype != "fp32" or setup.activation_checkpointing:
                raise ConfigError(
                    "--measure: expected fp32 without activation checkpointing with --pipeline (this machine's CPU), "
                    f"got {setup.dtype!r}"
                )
            report.extra["pipeline"]["measured"] = measure_pipeline(cfg.model, pipeline, optim=cfg.optim)
    if cfg.quant.bits:  # a checkpoint written by `moelab quantize`: what its weights take resident
        from ...model.quant import planned_bytes

        report.extra["quantized_weight_bytes"] = planned_bytes(
            cfg.model, cfg.quant.bits, cfg.quant.group_size, cfg.quant.what
        )
    return report
