#!/usr/bin/env bash
# Every GPU figure docs/benchmarks.md asks for, in one command on a CUDA machine:
#   1. the MoE layer benchmark in bf16 (moelab vs dense FFN vs Hugging Face grouped_mm);
#   2. small-moe and small-dense, 50 training steps each at train.precision=auto (bf16
#      on the card), tokens/s and peak memory from their metrics;
#   3. the expert-parallel dispatcher over NCCL under torchrun (world size 1: every
#      all-to-all runs, to itself) and a 1-process torchrun training run on that path;
#   4. `moelab profile` of the trained MoE run: where its step's time goes on the card,
#      next to its dense twin and to itself with balanced routing;
#   5. `moelab bench-infer` of the trained MoE run: KV-cached decode tokens/s at batch 1 and 8
#      and resident memory, next to its dense twin and its dense total twin;
#   6. Muon's optimizer step on the MoE and its dense twin, the iteration in fp32 and in bf16
#      (what optim.ns_dtype=auto takes on the card), Dion and AdamW for the experts beside them.
# Results go to $OUT (default gpu-check/) and are printed at the end.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # here: the same steps on CPU, tiny sizes, fp32
# DATA=SRC replaces the training text (default stdlib).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu-check}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ $DRY == 1 ]]; then
  DEV=cpu; DTYPE=fp32; STEPS=2; DENSE=tiny-dense; MOE=tiny-moe; LAYER_ARGS="--shapes 2 --rounds 1 --no-hf"
  SIZE=(model.vocab_size=512 model.d_model=32 model.n_layers=2 model.n_heads=2 model.n_kv_heads=1
        model.d_ff=64 model.max_seq_len=32 data.seq_len=32 train.batch_size=4
        model.moe.d_expert=16 model.moe.n_experts=4 data.tokenizer_train_bytes=300000)
  EP_ARGS="--tokens 256 --rounds 1"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry-run')"
  DEV=cuda; DTYPE=bf16; STEPS=50; DENSE=small-dense; MOE=small-moe; LAYER_ARGS="--rounds 7"; SIZE=()
  EP_ARGS=""
fi
COMMON=(--data "${DATA:-stdlib}" --steps "$STEPS" --quiet --overwrite train.eval_every=100000 train.ckpt_every=100000
        train.log_every=1 "${SIZE[@]}")

echo "== 1/6 MoE layer, $DTYPE on $DEV"
"$PY" benchmarks/moe_layer.py --device "$DEV" --dtype "$DTYPE" $LAYER_ARGS | tee "$OUT/layer.txt"

echo "== 2/6 $MOE and $DENSE, $STEPS steps, train.precision=auto"
for r in "$DENSE" "$MOE"; do
  # model sizes of the dry run are overrides of the recipes'; the MoE ones do not apply to dense
  args=()
  for a in "${COMMON[@]}"; do [[ $r == "$DENSE" && $a == model.moe.* ]] || args+=("$a"); done
  "$PY" -m moelab train "$r" --out "$OUT/$r" "${args[@]}" train.precision=auto
done
"$PY" - "$OUT" "$DENSE" "$MOE" <<'PY' | tee "$OUT/train.txt"
import json, statistics, sys
out, *recipes = sys.argv[1:]
for r in recipes:
    rows = [json.loads(l) for l in open(f"{out}/{r}/metrics.jsonl")]
    tps = statistics.median(x["tokens_per_s"] for x in rows[len(rows) // 5:])  # past the warm-up steps
    peak = max(x["peak_mem_bytes"] for x in rows)
    print(f"{r}: {tps:,.0f} tokens/s (median after warm-up), peak memory {peak / 2**30:.2f} GiB, "
          f"final loss {rows[-1]['loss']:.4f}")
PY

echo "== 3/6 expert parallelism under torchrun (world size 1)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/ep_check.py $EP_ARGS | tee "$OUT/ep.txt"
"$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m moelab train "$MOE" --out "$OUT/torchrun-$MOE" \
  "${COMMON[@]}" --steps 5 train.ckpt_every=5 | tee -a "$OUT/ep.txt"
test -f "$OUT/torchrun-$MOE/checkpoints/step-000005/dcp/.metadata" && echo "torchrun run: DCP checkpoint written" | tee -a "$OUT/ep.txt"

echo "== 4/6 profile of $OUT/$MOE: the step by phase, its dense twin, balanced routing"
PROFILE=(--steps 10 --rounds 3 --warmup 2)
[[ $DRY == 1 ]] && PROFILE=(--steps 2 --rounds 1 --warmup 1)
"$PY" -m moelab profile "$OUT/$MOE" "${PROFILE[@]}" --out "$OUT/profile" --overwrite \
  | tee "$OUT/profile.txt"

echo "== 5/6 inference of $OUT/$MOE: decode with the KV cache, its dense twin, its dense total twin"
INFER=(--rounds 3 --batch 1,8)
[[ $DRY == 1 ]] && INFER=(--rounds 1 --batch 1,2)
"$PY" -m moelab bench-infer "$OUT/$MOE" "${INFER[@]}" | tee "$OUT/inference.txt"

echo "== 6/6 Muon's optimizer step on $MOE and its dense twin: fp32 and bf16 iteration, Dion, AdamW for the experts"
MUON=(--rounds 5 --steps 5)
[[ $DRY == 1 ]] && MUON=(--rounds 1 --steps 1)
for a in "${SIZE[@]}"; do MUON+=(--set "$a"); done
"$PY" benchmarks/muon_step.py --moe "$MOE" --device "$DEV" --ways jordan,bf16-jordan,dion-experts,adamw-experts \
  "${MUON[@]}" | tee "$OUT/muon.txt"

echo "== done: $OUT/layer.txt, $OUT/train.txt, $OUT/ep.txt, $OUT/profile.txt, $OUT/inference.txt, $OUT/muon.txt"
