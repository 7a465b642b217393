"""`moelab finetune-report` end to end on tiny bases: every applicable variant runs,
scores are consistent, the doc section is replaced in place, a rerun reuses the runs."""
import json

from conftest import TINY, run_cli


def test_finetune_report_end_to_end(tmp_path, text_file):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"double {i}:", "completion": f" {2 * i}"}) + "\n"
                           for i in range(60)))
    doc = tmp_path / "docs" / "finetuning.md"
    doc.parent.mkdir()
    doc.write_text("# Fine-tuning\n\nintro\n\n<!-- finetune-report:begin -->\nold\n"
                   "<!-- finetune-report:end -->\n\nafterword\n")
    sets = [a for kv in TINY for a in ("--set", kv)]
    args = ["finetune-report", "--out", str(tmp_path / "rep"), "--bases", "tiny-dense,tiny-moe",
            "--data", str(sft), "--pretrain-data", str(text_file), "--pretrain-steps", "4", "--steps", "4",
            "--train-examples", "24", "--batch-size", "4", *sets, "--ft-set", "train.threads=1",
            "--doc", str(doc), "--quiet"]
    run_cli(*args)
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    variants = {(r["base"], r["variant"]) for r in rep["rows"]}
    assert ("tiny-dense", "lora (attn + ffn)") in variants and ("tiny-dense", "freeze-experts") not in variants
    for v in ("full", "full + expert dropout 0.2", "full, aux loss off", "freeze-experts", "freeze-router",
              "experts-only", "lora (attn + experts)"):
        assert ("tiny-moe", v) in variants
    assert len(rep["rows"]) == 2 + 2 + 7
    base = {r["base"]: r for r in rep["rows"] if r["trainable"] == 0}
    # The held-out loss of one fine-tune, recomputed here from its checkpoint: the token
    # mean of cross-entropy over every held-out completion token, in one batch.
    import torch
    from moelab.finetune.run import finetune_data
    from moelab.store.run import load_run
    ft = load_run(tmp_path / "rep" / "finetune" / "tiny-moe" / "full")
    held = finetune_data(ft.cfg, str(sft), ft.tokenizer, ft.checkpoint.parent.parent, verbose=False).val
    x, y, mask = held.batch(list(range(len(held))))
    with torch.no_grad():
        logits = ft.model(x, y, mask).logits
    ref = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100))
    row = next(r for r in rep["rows"] if (r["base"], r["variant"]) == ("tiny-moe", "full"))
    assert abs(row["heldout_loss"] - ref) < 1e-5
    for r in rep["rows"]:
        if r["trainable"]:
            assert r["train_examples"] == 24 and r["tokens_per_s"] > 0
            if r["variant"] == "full":  # four steps on the same examples must lower their loss
                assert r["train_loss"] < base[r["base"]]["train_loss"]
    # routing drift on the held-out examples: none by the routers where the recipe freezes them
    drift = {r["variant"]: r for r in rep["rows"] if r["base"] == "tiny-moe" and r["trainable"]}
    for v in ("freeze-router", "experts-only"):
        assert drift[v]["router_drift"] == 0 and all(d["router"]["topk_changed"] == 0 for d in drift[v]["drift_layers"])
    assert drift["full"]["router_drift"] > 0 and drift["full"]["routing_drift"] > 0
    assert all("router_drift" not in r for r in rep["rows"] if r["base"] == "tiny-dense")
    for runs in rep["curves"].values():
        for _, curve in runs:
            assert curve[0][0] == 0 and curve[-1][0] == 4
    text = doc.read_text()
    assert text.startswith("# Fine-tuning\n\nintro\n") and text.rstrip().endswith("afterword")
    assert "old" not in text and "| tiny-moe | experts-only |" in text
    assert (doc.parent / "images" / "finetune_heldout_loss.png").stat().st_size > 0

    # a second invocation reuses the pretrained and fine-tuned runs and reproduces the table
    ckpts = sorted((tmp_path / "rep").rglob("model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    run_cli(*args)
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["rows"] == rep["rows"]

    # other fine-tuning settings redo the fine-tunes, never silently reuse them; other
    # pretraining settings are refused by name
    run_cli(*args, "--lr", "2e-3")
    for p, t in zip(ckpts, stamps):  # --lr is not LoRA's learning rate (--lora-lr is)
        redone = "finetune" in p.parts and not any(part.startswith("lora") for part in p.parts)
        assert (p.stat().st_mtime_ns != t) == redone, p
    rc, _, err = run_cli(*args, "--set", "optim.lr=5e-3", check=False)
    assert rc == 2 and "pretrained with other settings" in err
