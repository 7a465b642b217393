"""Fine-tuning: recipes freeze exactly what they say, loss masking, SFT data and split."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_corpus, TINY_MOE, run_cli, run_main
from moelab import ConfigError
from moelab.data.sft import SFTExamples, load_sft, read_sft_jsonl
from moelab.finetune import apply_recipe
from moelab.store.run import load_run
from moelab.store.checkpoint import latest_checkpoint


@pytest.fixture
def sft_file(tmp_path):
    lines = []
    for i in range(40):
        if i % 2:
            lines.append({"messages": [{"role": "system", "content": "Be terse."},
                                       {"role": "user", "content": f"add {i} and {i + 1}"},
                                       {"role": "assistant", "content": f"{2 * i + 1}"}]})
        else:
            lines.append({"prompt": f"double {i}:", "completion": f" {2 * i}"})
    p = tmp_path / "sft.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One trained base for the module: every test reads it and writes its fine-tune elsewhere."""
    root = tmp_path_factory.mktemp("base")
    corpus = write_corpus(root / "corpus.txt")
    run = root / "base"
    run_cli("train", "tiny-moe", "--data", str(corpus), "--out", str(run), "--steps", "4", "--quiet", *TINY_MOE,
            "model.max_seq_len=64", "data.seq_len=64")
    return run


def weights(run):
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


@pytest.mark.parametrize("recipe,frozen", [("freeze-experts", ".experts."), ("freeze-router", ".router."),
                                           ("experts-only", None)])
def test_recipes_freeze_bitwise(tmp_path, base_run, sft_file, recipe, frozen, capsys):
    out = tmp_path / recipe
    _, _, err = run_main(capsys, "finetune", str(base_run), "--data", str(sft_file), "--out", str(out), "--recipe", recipe,
                        "--steps", "3", "--quiet", "train.log_every=1", "finetune.expert_dropout=0.1")
    assert f"recipe '{recipe}'" in err and "aux loss ON" in err
    before, after = weights(base_run), weights(out)
    for k in before:
        is_frozen = (frozen in k) if frozen else (".experts." not in k)
        if is_frozen:
            assert torch.equal(before[k], after[k]), k
        elif not k.endswith("router.bias"):
            assert not torch.equal(before[k], after[k]), k
    report = json.loads((out / "finetune.json").read_text())
    assert report["recipe"] == recipe and 0 < report["trainable"] < report["total"]
    assert load_run(out).cfg.model.moe.expert_dropout == 0.1


def test_aux_loss_off_is_explicit(tmp_path, base_run, sft_file, capsys):
    out = tmp_path / "noaux"
    _, _, err = run_main(capsys, "finetune", str(base_run), "--data", str(sft_file), "--out", str(out), "--recipe", "full",
                        "--steps", "2", "--quiet", "finetune.aux_loss=off")
    assert "aux loss OFF" in err
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["loss"] == pytest.approx(rec["lm_loss"])


def test_loss_only_on_completions(base_run, sft_file):
    run = load_run(base_run)
    tok = run.tokenizer
    ex = read_sft_jsonl(sft_file)
    data = SFTExamples(ex[:4], tok, 64)
    assert len(data) == 4 and data.dropped == 0
    x, y, mask = data.batch([0, 1, 2, 3])
    # Trained targets decode to exactly the completion / assistant turn and end-of-text.
    assert tok.decode(y[0][y[0] != -100].tolist(), skip_special_tokens=False) == " 0<|endoftext|>"
    assert tok.decode(y[1][y[1] != -100].tolist(), skip_special_tokens=False) == "3<|endoftext|>"
    # The model's loss is the mean cross-entropy over those positions alone, and changing
    # what the prompt positions would predict does not change it.
    out = run.model(x, y, mask)
    logits = out.logits.float()
    keep = y != -100
    ref = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(out.lm_loss, ref)
    # Row 0 is "double 0:" -> " 0". Its prompt, tokenized on its own here, has n tokens;
    # all n-1 positions that would predict a prompt token are masked, and no others.
    n_prompt = len(tok.encode("double 0:", add_special_tokens=False).ids)
    assert int((mask[0] & ~keep[0]).sum()) == n_prompt - 1
    assert bool((y[0, : n_prompt - 1] == -100).all()) and bool((y[0, n_prompt - 1: int(mask[0].sum())] != -100).all())
    # Padding is neither routed nor counted in the MoE statistics.
    n_real = int(mask.sum())
    assert int(out.moe_stats[0].tokens_per_expert.sum()) == n_real * 2


def test_bad_sft_lines_and_dense_refusal(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: no assistant turn"):
        read_sft_jsonl(bad)
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match="expected 'messages' or 'prompt' and 'completion'"):
        read_sft_jsonl(bad)
    from moelab import ModelConfig, Transformer
    with pytest.raises(ConfigError, match="has no experts"):
        apply_recipe(Transformer(ModelConfig(vocab_size=20, d_model=8, n_heads=2, n_layers=1, d_ff=8)),
                     "freeze-experts")


def test_stdlib_docstrings_split_deterministic_and_module_disjoint():
    train, val = load_sft("stdlib-docstrings")
    train2, val2 = load_sft("stdlib-docstrings")
    assert [e.segments for e in val] == [e.segments for e in val2] and len(train) == len(train2)
    assert len(train) > 1000 and len(val) > 20
    assert not {e.group for e in train} & {e.group for e in val}
    prompt, body = val[0].segments[0][0], val[0].segments[1][0]
    assert prompt.lstrip().startswith(("def ", "async def ", "@")) and body.strip()


def test_lora_reaches_experts_and_merges(tmp_path, base_run, sft_file, capsys):
    from moelab.model.lora import apply_lora, merge_lora
    base = load_run(base_run).model
    tokens = torch.randint(0, 200, (2, 20))
    with torch.no_grad():
        ref = base(tokens).logits
    n = apply_lora(base, ["attn", "experts", "router"], rank=4, alpha=8)
    assert n == 2 * (4 + 3 + 1)
    with torch.no_grad():
        torch.testing.assert_close(base(tokens).logits, ref)  # B = 0: unchanged at init
    trainable = [k for k, p in base.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)
    assert any(".experts." in k for k in trainable)

    out = tmp_path / "lora"
    _, _, err = run_main(capsys, "finetune", str(base_run), "--data", str(sft_file), "--out", str(out), "--recipe", "lora",
                        "--steps", "3", "--quiet", "lora.rank=4", "lora.targets=attn,experts,router",
                        "optim.lr=0.05")
    assert "recipe 'lora'" in err and "lora_adapters" in err
    before, after = weights(base_run), weights(out)
    for k, v in before.items():
        adapted = k.rsplit(".", 1)[0] + ".parametrizations." + k.rsplit(".", 1)[1] + ".original"
        assert torch.equal(v, after.get(k, after.get(adapted))), k  # base weights bitwise unchanged
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if k.endswith("lora_B"))

    # Merged (what load_run gives) equals the unmerged adapter model.
    from moelab import Transformer
    ft_cfg = load_run(out).cfg
    unmerged = Transformer(ft_cfg.model)
    apply_lora(unmerged, ft_cfg.lora.target_list(), ft_cfg.lora.rank, ft_cfg.lora.alpha)
    unmerged.load_state_dict(after)
    unmerged.eval()
    merged = load_run(out).model
    with torch.no_grad():
        u = unmerged(tokens).logits
        torch.testing.assert_close(merged(tokens).logits, u, atol=1e-5, rtol=1e-5)
        merge_lora(unmerged)
        torch.testing.assert_close(unmerged(tokens).logits, u, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(u, ref)

    # The peft adapter, on the exported base model, gives moelab's logits.
    import transformers
    import peft
    _, stdout, _ = run_main(capsys, "export", str(out), "--out", str(tmp_path / "hf"), "--peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "base")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "hf" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(tokens).logits, u, atol=1e-4, rtol=1e-4)


def test_lora_targets_that_train_nothing_are_errors():
    from moelab import ModelConfig, Transformer
    from moelab.model.lora import apply_lora
    dense = Transformer(ModelConfig(vocab_size=20, d_model=8, n_heads=2, n_layers=1, d_ff=8))
    with pytest.raises(ConfigError, match="'experts' matches no parameter.*no experts"):
        apply_lora(dense, ["attn", "experts"], 4, 8)
    with pytest.raises(ConfigError, match="unknown target 'mlp'"):
        apply_lora(dense, ["mlp"], 4, 8)
