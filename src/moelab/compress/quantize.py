"""`moelab quantize`: a run's weights quantized group-wise (model/quant.py) and written
as a run folder that eval, generate, memory and export read."""

from __future__ import annotations

import copy
from pathlib import Path

from ..convert.io import write_model_folder
from ..data.chat import copy_tokenizer_extras
from ..errors import ConfigError
from ..model.quant import default_group_size, quantize_model, resident_bytes
from ..store.outputs import check_output, staged_output
from ..store.run import load_run


def quantize_checkpoint(
    src: str, out: str, bits: int, *, group_size: int | None = None, what: str = "experts", overwrite: bool = False
) -> tuple[Path, int, int, int]:
    """Write a quantized copy of run or checkpoint `src` as a run folder `out` (step 0) that eval, generate and
    export-free inference load; `group_size` None: `default_group_size`. Returns (folder, bytes before, after, the
    group size)."""

    check_output(out, overwrite=overwrite, protect=[src], kind="run")
    r = load_run(src, device="cpu")
    if r.cfg.quant.bits:
        raise ConfigError(f"{src} is already quantized ({r.cfg.quant.bits} bits); quantize the original run")
    before = resident_bytes(r.model)
    group_size = group_size or default_group_size(r.model, what)
    quantize_model(r.model, bits, group_size, what)
    cfg = copy.deepcopy(r.cfg)
    cfg.quant.bits, cfg.quant.group_size, cfg.quant.what = bits, group_size, what  # type: ignore[assignment]  # `what` was checked by targets()
    cfg.finetune.recipe = "none"  # LoRA adapters were merged on load
    cfg.name = f"{r.cfg.name}-int{bits}"
    run_dir = r.checkpoint.parent.parent
    with staged_output(out, overwrite=overwrite, protect=[src, run_dir], kind="run") as tmp:
        write_model_folder(tmp, cfg, r.model, run_dir / "tokenizer.json", {"quantized_from": str(r.checkpoint)})
        copy_tokenizer_extras(run_dir, tmp)
    return Path(out), before, resident_bytes(r.model), group_size
