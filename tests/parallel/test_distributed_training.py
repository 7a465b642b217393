"""Training over 2 real processes (gloo) equals one process over the same global batch:
the logged losses and the final weights (atol 1e-5), for FSDP2, expert parallelism with
data parallelism, gradient accumulation, global balancing and the Muon optimizer; checkpoints written by 2
processes resume in 1 and the other way round with the same next-step losses.

Adam's eps is raised to 1e-6 in these runs: at eps=1e-8 a gradient element near zero is
turned into an update of up to a whole learning rate by its sign, so fp32 summation-order
noise between layouts (~1e-10) would show as 1e-5 weight differences."""
import json
import sys
from pathlib import Path

import pytest
import torch

from moelab.run_config import load_config
from moelab.train import train
from moelab.store.checkpoint import latest_checkpoint, model_tensors

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_MOE  # noqa: E402
from launch import spawn  # noqa: E402

BASE = [*TINY_MOE, "train.log_every=1", "train.eval_every=100", "model.moe.jitter=0", "optim.eps=1e-6",
        "model.moe.balance_scope=global", "model.moe.lb_coef=0.01", "model.moe.z_coef=0.001"]


def run(rank, out, corpus, overrides, steps, kwargs):
    cfg = load_config("tiny-moe", [*BASE, *overrides])
    cfg.data.source, cfg.train.steps = str(corpus), steps
    train(cfg, out, quiet=True, **kwargs)


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in records(run_dir)]


def assert_same_weights(a_dir, b_dir):
    a = model_tensors(latest_checkpoint(Path(a_dir) / "checkpoints"))
    b = model_tensors(latest_checkpoint(Path(b_dir) / "checkpoints"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)


LAYOUTS = {
    "fsdp2 shard=2": (["parallel.data_shard=2"], []),
    "ep=2, replicated": (["parallel.expert=2"], []),
    "ep=2, shared expert, sigmoid router": (
        ["parallel.expert=2"], ["model.moe.n_shared_experts=1", "model.moe.shared_gate=true", "model.moe.router=sigmoid"]
    ),
    "ep=2, shard=2, grad accum 2, bias balancing": (
        ["parallel.expert=2", "parallel.data_shard=2"],
        ["train.grad_accum=2", "model.moe.bias_update_rate=0.01"],
    ),
    # Muon: sharded matrices gathered whole for Newton-Schulz, experts whole on their rank
    "ep=2, shard=2, muon": (["parallel.expert=2", "parallel.data_shard=2"], ["optim.name=muon"]),
    # Dion for the experts: each rank steps its experts' bases, which start alike whatever rank holds them
    "ep=2, muon, dion experts": (["parallel.expert=2"], ["optim.name=muon", "optim.muon_experts=dion"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_processes_train_like_one(tmp_path, text_file, name):
    layout, common = LAYOUTS[name]
    run(0, tmp_path / "one", text_file, common, 4, {})
    spawn(2, run, tmp_path / "two", text_file, [*common, *layout], 4, {})
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(two) == 4  # written once, by rank 0
    assert two == pytest.approx(one, abs=1e-5)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    # the logged router statistics are the global batch's, not rank 0's half
    for a, b in zip(records(tmp_path / "one"), records(tmp_path / "two"), strict=True):
        for la, lb in zip(a["moe_layers"], b["moe_layers"], strict=True):
            assert lb["load"] == pytest.approx(la["load"], abs=1e-4)
            assert lb["lb_loss"] == pytest.approx(la["lb_loss"], abs=1e-5)
            assert lb["dead_experts"] == la["dead_experts"]
    assert (latest_checkpoint(tmp_path / "two" / "checkpoints") / "dcp" / ".metadata").is_file()


def test_global_balance_is_global_and_micro_is_per_rank(tmp_path, text_file):
    """With balance_scope=micro each rank balances its own tokens, so 2 ranks differ from
    one process (the parity above depends on `global` being global); with global they do not."""
    def lb_losses(d):
        return [r["lb_loss"] for r in records(tmp_path / d)]

    for scope in ("micro", "global"):
        overrides = ["train.grad_accum=2", f"model.moe.balance_scope={scope}"]
        run(0, tmp_path / f"one-{scope}", text_file, overrides, 2, {})
        spawn(2, run, tmp_path / f"two-{scope}", text_file, [*overrides, "parallel.expert=2"], 2, {})
    one, two = lb_losses("one-micro"), lb_losses("two-micro")
    assert len(one) == len(two) == 2 and abs(one[0] - two[0]) > 1e-6, (one, two)  # per rank: differs
    one, two = lb_losses("one-global"), lb_losses("two-global")
    assert len(one) == 2 and two == pytest.approx(one, abs=1e-6)  # global: the one-process value
    assert abs(one[0] - lb_losses("one-micro")[0]) > 1e-6  # ... and global is not micro in disguise


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_checkpoint_reshards_between_world_sizes(tmp_path, text_file, first, second):
    layout = ["parallel.expert=2", "parallel.data_shard=2"]
    overrides = ["model.moe.bias_update_rate=0.01", "train.ckpt_every=2"]
    run(0, tmp_path / "ref", text_file, overrides, 4, {})

    def leg(world, kwargs):
        if world == 1:
            run(0, tmp_path / "run", text_file, overrides, 4, kwargs)
        else:
            spawn(2, run, tmp_path / "run", text_file, [*overrides, *layout], 4, kwargs)

    leg(first, {"stop_after": 2})
    leg(second, {"resume": True})
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "ref"), abs=1e-5)
    assert_same_weights(tmp_path / "ref", tmp_path / "run")


def run_dense(rank, out, corpus):
    from conftest import TINY

    cfg = load_config("tiny-dense", [*TINY, "train.log_every=1", "parallel.data_shard=2"])
    cfg.data.source, cfg.train.steps = str(corpus), 2
    train(cfg, out, quiet=True)


def test_upcycle_and_finetune_read_a_distributed_run(tmp_path, text_file):
    """A dense run written by 2 FSDP2 processes is upcycled (exactly the dense model at
    step 0) and fine-tuned in one process, straight from its DCP checkpoint; its saved
    config carries no process layout, so what derives from it needs no torchrun."""
    from conftest import run_cli
    from moelab.cli import main
    from moelab.data import Sampler
    from moelab.finetune.run import finetune_data
    from moelab.run_config import read_config
    from moelab.store.run import load_run
    from moelab.train.setup import run_data

    spawn(2, run_dense, tmp_path / "dense", text_file)
    assert (latest_checkpoint(tmp_path / "dense" / "checkpoints") / "dcp" / ".metadata").is_file()
    assert "parallel" not in (tmp_path / "dense" / "config.yaml").read_text()
    run_cli("upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "up"))
    dense, up = load_run(tmp_path / "dense"), load_run(tmp_path / "up")
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(up.model(tokens).logits, dense.model(tokens).logits, atol=1e-5, rtol=1e-5)
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"double {i}:", "completion": f" {2 * i}"}) + "\n"
                           for i in range(40)))
    # fine-tuning starts from the DCP run's weights: its first LM loss is the dense model's
    # on the same first batch of examples, worked out here
    assert main(["finetune", str(tmp_path / "dense"), "--data", str(sft), "--out", str(tmp_path / "ft"), "--recipe",
                 "full", "--steps", "2", "--quiet", "train.log_every=1"]) == 0
    ft_cfg = read_config(tmp_path / "ft" / "config.yaml")
    ft_data = finetune_data(ft_cfg, str(sft), dense.tokenizer, tmp_path / "dense", verbose=False)
    x, y, mask = ft_data.train.batch(Sampler(len(ft_data.train), ft_cfg.train.batch_size, ft_cfg.train.seed).next())
    with torch.no_grad():
        expected = float(dense.model(x, y, mask).lm_loss)
    assert len(records(tmp_path / "ft")) == 2
    assert records(tmp_path / "ft")[0]["lm_loss"] == pytest.approx(expected, abs=1e-5)
    # training on from the upcycled model starts from the dense model's function: its first
    # LM loss is the dense model's loss on the same first batch, worked out here
    assert main(["train", str(tmp_path / "up" / "config.yaml"), "--init", str(tmp_path / "up"), "--data",
                 str(text_file), "--out", str(tmp_path / "cont"), "--steps", "1", "--quiet"]) == 0
    cfg = read_config(tmp_path / "cont" / "config.yaml")
    data = run_data(cfg, tmp_path / "cont" / "tokenizer.json")
    x, y = data.train.batch(Sampler(len(data.train), cfg.train.batch_size, cfg.train.seed).next())[:2]
    with torch.no_grad():
        expected = float(dense.model(x, y).lm_loss)
    assert records(tmp_path / "cont")[0]["lm_loss"] == pytest.approx(expected, abs=1e-5)


def test_consolidated_run_resumes_like_the_distributed_one(tmp_path, text_file):
    """`moelab consolidate` writes a 2-process checkpoint as safetensors files: the same
    weights, and resuming from it in one process continues with the losses of resuming
    from the DCP folder itself."""
    from safetensors.torch import load_file

    from conftest import run_cli

    overrides = ["parallel.expert=2", "model.moe.bias_update_rate=0.01", "train.ckpt_every=2"]
    spawn(2, run, tmp_path / "dist", text_file, overrides, 3, {"stop_after": 2})
    run_cli("consolidate", str(tmp_path / "dist"), "--out", str(tmp_path / "single"))
    ckpt = latest_checkpoint(tmp_path / "single" / "checkpoints")
    assert ckpt.name == "step-000002" and not (ckpt / "dcp").exists()
    dcp_weights = model_tensors(latest_checkpoint(tmp_path / "dist" / "checkpoints"))
    files = load_file(str(ckpt / "model.safetensors"))
    assert files.keys() == dcp_weights.keys() and all(torch.equal(files[k], dcp_weights[k]) for k in files)
    run(0, tmp_path / "single", text_file, ["model.moe.bias_update_rate=0.01", "train.ckpt_every=2"], 3,
        {"resume": True})
    run(0, tmp_path / "dist", text_file, ["model.moe.bias_update_rate=0.01", "train.ckpt_every=2"], 3,
        {"resume": True})
    assert losses(tmp_path / "single") == losses(tmp_path / "dist")
    rc, _, err = run_cli("consolidate", str(tmp_path / "single"), "--out", str(tmp_path / "again"), check=False)
    assert rc == 2 and "already a single-process checkpoint" in err


def test_four_processes_hsdp_with_expert_sharding_and_resharding_down_to_one(tmp_path, text_file):
    """4 ranks: dense weights sharded 2 ways and replicated 2 ways (HSDP), experts split
    over 2 expert-parallel ranks and each slice sharded over 2 more: equal to one process.
    Then a run stopped at 4 ranks continues on 2 (EP only), then on 1, unchanged."""
    common = ["train.batch_size=8", "model.moe.bias_update_rate=0.01", "train.ckpt_every=2", "train.grad_accum=2"]
    layout = ["parallel.expert=2", "parallel.data_shard=2", "parallel.data_replicate=2"]
    run(0, tmp_path / "one", text_file, common, 4, {})
    spawn(4, run, tmp_path / "four", text_file, [*common, *layout], 4, {})
    assert losses(tmp_path / "four") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert_same_weights(tmp_path / "one", tmp_path / "four")
    spawn(4, run, tmp_path / "re", text_file, [*common, *layout], 4, {"stop_after": 2})
    spawn(2, run, tmp_path / "re", text_file, [*common, "parallel.expert=2"], 4, {"stop_after": 1, "resume": True})
    run(0, tmp_path / "re", text_file, common, 4, {"resume": True})
    assert losses(tmp_path / "re") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert_same_weights(tmp_path / "one", tmp_path / "re")
