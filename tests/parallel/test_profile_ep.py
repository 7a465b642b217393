"""The imbalance meter under expert parallelism, 2 real processes (gloo): a router that
sends every token to rank 0's experts makes rank 1 wait in the all-to-all; with the same
weights and balanced routing neither rank waits for the other."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from launch import spawn  # noqa: E402


def profile_biased(rank, corpus):
    import torch
    from conftest import TINY_MOE

    from moelab.analysis.profile.timing import profile_variants
    from moelab.analysis.profile.report import _result
    from moelab.model import Transformer
    from moelab.parallel.mesh import close_parallel, init_parallel
    from moelab.run_config import load_config
    from moelab.train.setup import run_data

    cfg = load_config("tiny-moe", [*TINY_MOE, "parallel.expert=2", "train.batch_size=32", "model.moe.d_expert=256",
                                   "model.moe.bias_update_rate=1e-12"])
    cfg.data.source = str(corpus)
    par = init_parallel(cfg)
    data = run_data(cfg)
    torch.manual_seed(0)
    state = Transformer(cfg.model).state_dict()
    for k in state:
        if k.endswith("router.bias"):  # the choice (not the combine weights) goes to experts 0 and 1: rank 0's
            state[k] = torch.tensor([20.0, 20.0, 0.0, 0.0])
    tables = profile_variants(cfg, state, data, par.device, steps=3, warmup=1, rounds=1, par=par)
    res = _result(cfg, "biased", tables, par)
    close_parallel(par)
    return res


def test_a_router_biased_to_one_rank_makes_the_other_wait_and_balanced_routing_does_not(text_file):
    from conftest import TINY_MOE

    from moelab.run_config import load_config
    from moelab.train.setup import run_data

    cfg = load_config("tiny-moe", TINY_MOE)
    cfg.data.source = str(text_file)
    run_data(cfg)  # tokenized once here, so the two ranks only read the cache
    res = spawn(2, profile_biased, text_file)[0]
    assert res["world"] == 2 and res["expert_parallel"] == 2
    meter = res["imbalance"]
    assert meter["rank_max_over_mean"] == [2.0, 2.0]  # every row on rank 0, per MoE layer
    learned, forced = meter["all_to_all_share"]["moe"], meter["all_to_all_share"]["moe, balanced"]
    assert learned[1] > learned[0] and max(learned) > 1.15 * max(forced), meter["text"]
    moe, dense, balanced = res["tables"]
    assert len(moe["ranks"]) == 2 and "all-to-all" in moe["ranks"][1]["bwd_ms"]  # backward exchanges attributed
    assert "all-to-all" not in dense["rows_ms"]
