"""One export entry point: a run or checkpoint out as a Hugging Face folder, a Hugging Face base
plus a peft adapter (LoRA runs), or a GGUF file for llama.cpp. A new format is one function
here and one entry in FORMATS."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..store.outputs import check_file_output, check_output, staged_file, staged_output
from ..store.run import LoadedRun, load_run


@dataclass
class Exported:
    """What an export wrote (`path`), a one-line description, and notes the user should read."""

    path: Path
    summary: str
    notes: list[str] = field(default_factory=list)


def _hf(r: LoadedRun, run_dir: Path, out: Path, overwrite: bool, arch: str | None, **_) -> Exported:
    from .io import export_hf

    with staged_output(out, overwrite=overwrite, protect=[run_dir], kind="hf") as tmp:
        export_hf(r.model, tmp, run_dir / "tokenizer.json", arch)
    model_type = json.loads((out / "config.json").read_text())["model_type"]
    return Exported(out, f"exported {r.checkpoint} -> {out} ({model_type})")


def _peft(r: LoadedRun, run_dir: Path, out: Path, overwrite: bool, **_) -> Exported:
    if r.cfg.finetune.recipe != "lora":
        raise ConfigError("--peft: this run was not fine-tuned with --recipe lora")
    if r.cfg.quant.bits:
        raise ConfigError("--peft: a quantized run holds merged weights, no adapters")
    from ..store.checkpoint import model_tensors
    from .peft import export_peft

    with staged_output(out, overwrite=overwrite, protect=[run_dir], kind="peft") as tmp:
        export_peft(r.cfg, model_tensors(r.checkpoint), run_dir / "tokenizer.json", tmp)
    base, adapter = out / "base", out / "adapter"
    return Exported(
        adapter,
        f"exported base model -> {base}\nexported peft adapter -> {adapter}\n"
        f"load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base}'), '{adapter}')",
    )


def _gguf(r: LoadedRun, run_dir: Path, out: Path, overwrite: bool, outtype: str = "f32", **_) -> Exported:
    from .gguf import gguf_arch, write_gguf

    gguf_arch(r.model)  # refuse before any file is made
    with staged_file(out, overwrite=overwrite, protect=[run_dir], magic=GGUF_MAGIC) as tmp:
        arch = write_gguf(r.model, run_dir / "tokenizer.json", tmp, outtype, name=run_dir.name)
    size = out.stat().st_size / 2**20
    return Exported(
        out, f"exported {r.checkpoint} -> {out} (GGUF {arch}, {outtype}, {size:.1f} MiB; run it: llama-cli -m {out})"
    )


GGUF_MAGIC = b"GGUF"  # a file's first bytes: --overwrite replaces only a GGUF file
FORMATS: dict[str, Callable[..., Exported]] = {"hf": _hf, "peft": _peft, "gguf": _gguf}


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    format: str = "hf",
    arch: str | None = None,
    outtype: str = "f32",
    overwrite: bool = False,
) -> Exported:
    """Export `run` (a run folder or checkpoint) in `format` ("hf", "peft" or "gguf") to `out`, staged so
    that nothing half-written is left looking complete. A quantized run is written dequantized."""
    if format not in FORMATS:
        raise ConfigError(f"--format: expected one of {sorted(FORMATS)}, got {format!r}")
    if format == "gguf":
        from .gguf import OUTTYPES

        if outtype not in OUTTYPES:
            raise ConfigError(f"--outtype: expected one of {list(OUTTYPES)}, got {outtype!r}")
        check_file_output(out, overwrite=overwrite, protect=[run], magic=GGUF_MAGIC)
    elif outtype != "f32":
        raise ConfigError(f"--outtype {outtype}: only --format gguf writes other types (Hugging Face: fp32)")
    if arch is not None and format != "hf":
        raise ConfigError(f"--arch: a Hugging Face target; --format {format} picks its own architecture")
    out = Path(out)
    if format != "gguf":
        check_output(out, overwrite=overwrite, protect=[run], kind=format)
    r = load_run(run, device="cpu")
    run_dir = r.checkpoint.parent.parent
    notes = []
    if r.cfg.quant.bits and format != "peft":
        from ..model.quant import dequantize_model

        dequantize_model(r.model)
        notes.append(
            f"note: {run} holds {r.cfg.quant.bits}-bit weights ({r.cfg.quant.what}); exporting them dequantized "
            "(the values the quantized model computes with)"
        )
    done = FORMATS[format](r, run_dir, out, overwrite, arch=arch, outtype=outtype)
    done.notes = notes + done.notes
    return done
