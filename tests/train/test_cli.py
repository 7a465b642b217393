"""The command line end to end on tiny configs, metrics contents, and clear errors."""
import json

import pytest

from conftest import TINY, TINY_MOE, run_cli

METRIC_FIELDS = {"step", "tokens", "loss", "lm_loss", "lb_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
                 "peak_mem_bytes", "moe_layers"}
MOE_FIELDS = {"load", "max_violation", "dropped_fraction", "router_entropy", "lb_loss", "z_loss", "dead_experts"}


@pytest.mark.parametrize("recipe,overrides", [("tiny-dense", TINY), ("tiny-moe", TINY_MOE)])
@pytest.mark.parametrize("source", ["file", "stdlib"])
def test_train_eval_generate(tmp_path, text_file, recipe, overrides, source):
    data = str(text_file) if source == "file" else "stdlib"
    run = tmp_path / "run"
    run_cli("train", recipe, "--data", data, "--out", str(run), "--steps", "6", "--quiet", *overrides)
    for f in ("config.yaml", "tokenizer.json", "metrics.jsonl", "checkpoints/step-000006/model.safetensors"):
        assert (run / f).exists(), f
    assert any((run / "tb").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert METRIC_FIELDS <= set(r)
    n_moe = 2 if recipe == "tiny-moe" else 0
    assert all(len(r["moe_layers"]) == n_moe for r in records)
    for layer in records[-1]["moe_layers"]:
        assert MOE_FIELDS <= set(layer) and len(layer["load"]) == 4
        assert abs(sum(layer["load"]) - 1) < 1e-3
    assert "val_loss" in records[1] and "val_loss" in records[2]

    _, out, _ = run_cli("eval", str(run), "--data", data, "--json", "--max-tokens", "4000")
    ev = json.loads(out)
    assert set(ev) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert 0 < ev["loss"] < 7 and ev["tokens"] > 0 and 0 < ev["bits_per_byte"] < 10
    _, text, _ = run_cli("generate", str(run), "--prompt", "def main", "--max-new-tokens", "8")
    assert text.startswith("def main") and len(text) > len("def main")


def test_cli_errors_are_one_clear_line(tmp_path, text_file, capsys):
    from moelab.cli import main

    def err(*args):  # in this process: an exception that escaped would fail the test itself
        capsys.readouterr()
        assert main(list(args)) == 2
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("moelab "), stderr
        return stderr

    out = str(tmp_path / "r")
    assert "does not exist" in err("train", "tiny-moe", "--data", str(tmp_path / "nope.txt"), "--out", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "contains no text" in err("train", "tiny-moe", "--data", str(empty), "--out", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    assert f"{bad}:2: not valid JSON" in err("train", "tiny-moe", "--data", str(bad), "--out", out)
    bad.write_text('{"text": "fine"}\n{"body": "x"}\n')
    assert f"{bad}:2: expected an object with a string field 'text'" in err("train", "tiny-moe", "--data",
                                                                           str(bad), "--out", out)
    assert "model.moe.n_expert: unknown key" in err("train", "tiny-moe", "--out", out, "model.moe.n_expert=3")
    assert "train.steps: expected an integer, got 'many'" in err("train", "tiny-moe", "--out", out, "train.steps=many")
    assert "model.moe.top_k: top_k=9 exceeds n_experts=8" in err("train", "tiny-moe", "--out", out,
                                                                 "model.moe.top_k=9")

    run = tmp_path / "run"
    assert main(["train", "tiny-moe", "--data", str(text_file), "--out", str(run), "--steps", "4", "--quiet",
                 *TINY_MOE]) == 0
    assert "already exists and is not empty: pass --resume" in err("train", "tiny-moe", "--data", str(text_file), "--out", str(run),
                                                  "--steps", "4", *TINY_MOE)
    ckpt = run / "checkpoints" / "step-000004"
    model = ckpt / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    assert "model.safetensors is truncated" in err("eval", str(ckpt), "--data", str(text_file))
    model.unlink()
    assert "model.safetensors is missing" in err("eval", str(ckpt), "--data", str(text_file))
    assert "holds no complete checkpoint" in err("eval", str(run), "--data", str(text_file))
