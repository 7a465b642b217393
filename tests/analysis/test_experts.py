"""moelab experts: what the experts take, checked on a model trained on two synthetic
domains; stability and fine-tuning drift recomputed here from the routers' own logits
(the router input read by a hook on the MoE layer, top-k taken by hand); token classes
against a hand count."""
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_MOE, run_main

from moelab import ModelConfig, MoEConfig, Transformer
from moelab.analysis.experts.analyse import analyse, domain_batches
from moelab.analysis.experts.routes import CLASSES, LayerDiff, TokenTable, domain_dependence, expert_similarity
from moelab.convert.upcycle import upcycle
from moelab.data.tokenizer import train_tokenizer
from moelab.finetune.recipes import apply_recipe
from moelab.finetune.run import finetune
from moelab.run_config import load_config
from moelab.store.run import load_run
from moelab.train import train

# Two domains, same number of tokens per line, each needing a two-token rule (so the FFN,
# not the embeddings alone, must learn it): digits follow a Fibonacci rule mod 10, the
# two-letter words one mod 7. A 2-expert top-1 model learns to give each its own expert.
WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn"]
MODEL = ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
         "model.d_ff=64", "model.max_seq_len=64", "data.seq_len=64", "train.batch_size=8", "train.eval_every=200",
         "train.eval_batches=2", "train.ckpt_every=200", "train.keep_checkpoints=2", "optim.warmup_steps=10",
         "train.threads=1", "model.moe.d_expert=8", "model.moe.n_experts=2", "model.moe.top_k=1",
         "model.moe.renormalize=false", "model.moe.lb_coef=0.01", "train.steps=400"]


def line(rng, kind: str, step: int = 1) -> str:
    mod = 10 if kind == "digits" else len(WORDS)
    out = [rng.randrange(mod), rng.randrange(mod)]
    for _ in range(10):
        out.append((step * out[-1] + out[-2]) % mod)
    return " ".join(str(v) if kind == "digits" else WORDS[v] for v in out)


def corpus(folder, docs=200, lines=10):
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": " ".join(line(rng, k) for _ in range(lines)), "domain": k}
            for k in ["digits", "words"] * (docs // 2)]
    (folder / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for kind in ("digits", "words"):
        texts = [r["text"] for r in rows if r["domain"] == kind]
        (folder / f"{kind}.txt").write_text("\n".join(texts))
        if kind == "words":  # the same domain as two sources: routing cannot depend on which
            (folder / "words_a.txt").write_text("\n".join(texts[::2]))
            (folder / "words_b.txt").write_text("\n".join(texts[1::2]))
    # a shifted task for fine-tuning: the words' rule changes to a + 2b
    ex = [{"prompt": "", "completion": " ".join(line(rng, "words", step=2) for _ in range(3))} for _ in range(200)]
    (folder / "shifted.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ex))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    data = corpus(root / "data")
    # At this size whether the routers split by domain depends on the seed (3 of 4 did, seed 0
    # with shares 1.0 / 0.95): the first seed of three whose routing does is kept, so a host
    # whose arithmetic leads one seed elsewhere still has a specialised model to report on.
    for seed in (0, 2, 3):
        cfg = load_config("tiny-moe", [*MODEL, f"train.seed={seed}"])
        cfg.data.source = str(data / "mix.jsonl")
        train(cfg, root / "run", overwrite=True, quiet=True)
        res = analyse(load_run(root / "run"), [str(data / "digits.txt"), str(data / "words.txt")], split="all",
                      max_tokens=5000)
        if max(np.array(lay["domain_share"]).max(1).min() for lay in res["layers"]) >= 0.8:
            break
    return root, data


def test_dependence_and_token_classes_by_hand():
    assert domain_dependence(np.array([[10, 0], [0, 10]])) == pytest.approx(1.0)
    assert domain_dependence(np.array([[5, 5], [5, 5]])) == pytest.approx(0.0, abs=1e-12)
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # I = H(D) - H(D|E) = 1 - H2(1/4)
    assert domain_dependence(np.array([[3, 1], [1, 3]])) == pytest.approx(1 - h)
    assert domain_dependence(np.array([[7, 3]])) == 0.0  # one domain: nothing to depend on

    tok = train_tokenizer(["abc"], vocab_size=258, max_bytes=10)  # bytes only: one token per character
    text = "the 42, x_y\n  ok"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == len(text)
    got = TokenTable.from_tokenizer(tok, 258).classes(torch.tensor([ids]))[0].tolist()
    # by hand: t h e | ' ' | 4 2 | , | ' ' | x _ y | \n ' ' ' ' | o k
    want = {"whitespace": 5, "punctuation": 2, "digits": 2, "word start": 3, "word continuation": 4, "other": 0}
    assert {c: got.count(i) for i, c in enumerate(CLASSES)} == want
    table = TokenTable.from_texts([" the", "ing", "\n    ", " 42", "):", "x1", "\ufffd", ""])
    ids = torch.tensor([[0, 1, 2, 1, 3, 4, 5, 6, 7]])  # " the" "ing" "\n    " "ing" ...
    assert [CLASSES[c] for c in table.classes(ids)[0].tolist()] == [
        "word start", "word continuation", "whitespace", "word start", "digits", "punctuation", "other", "other",
        "other"]


def test_routing_differences_by_hand():
    d = LayerDiff(4)
    d.add(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 0], [2, 0]]))  # same set in another order; one kept of two
    s = d.summary()
    p, q = [0.25] * 4, [0.5, 0.25, 0.25, 0.0]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    h = lambda v: -sum(x * math.log2(x) for x in v if x > 0)  # noqa: E731
    assert (s["top1_changed"], s["topk_changed"], s["topk_kept"]) == (0.5, 0.5, 0.75)
    assert s["usage_js_bits"] == pytest.approx(h(m) - (h(p) + h(q)) / 2)


def test_expert_similarity_of_upcycled_copies():
    torch.manual_seed(0)
    dense = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8))
    names = ["layers.0.ffn", "layers.1.ffn"]
    copies = expert_similarity(upcycle(dense, 4, 2).state_dict(), names)
    assert copies == pytest.approx([1.0, 1.0])  # copies of one FFN are one direction
    dropped = expert_similarity(upcycle(dense, 4, 2, drop_ratio=0.5).state_dict(), names)
    assert all(0.2 < v < 0.9 for v in dropped), dropped  # half the units redrawn: apart, not unrelated
    w = torch.zeros(2, 3, 4)
    w[0, 0, 0], w[1, 0, 1] = 1.0, 1.0  # two experts with orthogonal weights: cosine 0
    assert expert_similarity({"m.experts.w_gate": w, "m.experts.w_up": w, "m.experts.w_down": w.mT}, ["m"]) == [0.0]


def _mutual_information_ratio(share_GE, tokens_G):
    """I(domain; expert) / H(domain) from P(expert | domain) and the domain sizes, as sum p log p/(p p)."""
    p_g = np.array(tokens_G, float) / sum(tokens_G)
    p_ge = p_g[:, None] * np.array(share_GE)
    p_e = p_ge.sum(0)
    mi = sum(p_ge[g, e] * math.log2(p_ge[g, e] / (p_g[g] * p_e[e]))
             for g in range(len(p_g)) for e in range(len(p_e)) if p_ge[g, e] > 0)
    return mi / -(p_g * np.log2(p_g)).sum()


def test_two_domains_go_to_their_own_experts(trained, tmp_path, capsys):
    root, data = trained
    out = tmp_path / "rep"
    _, stdout, _ = run_main(capsys, "experts", root / "run", "--data", f"{data / 'digits.txt'},{data / 'words.txt'}",
                            "--split", "all", "--out", out, "--tokens", "20000")
    res = json.loads((out / "experts.json").read_text())
    assert res["domains"] == ["digits.txt", "words.txt"] and (out / "report.html").is_file()
    best = max(res["layers"], key=lambda lay: lay["domain_dependence"])
    shares = np.array(best["domain_share"])  # [domain][expert]
    assert shares.max(1).min() >= 0.8, shares  # each domain mostly to one expert...
    assert shares[0].argmax() != shares[1].argmax()  # ...and not the same one
    toks = [res["tokens"][d] for d in res["domains"]]
    assert best["domain_dependence"] == pytest.approx(_mutual_information_ratio(shares, toks), abs=1e-9)
    assert best["domain_dependence"] >= 0.4
    assert "Domain (digits.txt, words.txt)" in stdout
    for lay in res["layers"]:  # top-1: two experts are never chosen for the same token
        co = np.array(lay["coactivation"])
        assert (co - np.diag(np.diag(co)) == 0).all() and np.diag(co).sum() == lay["tokens"]
        # every digits token is "digits" or "whitespace" by class; words are letters and spaces
        assert sum(lay["overall_class_share"][CLASSES.index(c)] for c in ("digits", "whitespace", "word start",
                                                                          "word continuation")) > 0.99

    # the same domains named by a .jsonl's `domain` field
    res2 = analyse(load_run(root / "run"), [str(data / "mix.jsonl")], split="all", max_tokens=20000)
    assert res2["domains"] == ["digits", "words"]
    lay2 = next(lay for lay in res2["layers"] if lay["layer"] == best["layer"])
    assert np.array(lay2["domain_share"]).max(1).min() >= 0.8

    # one domain offered as two sources: routing does not depend on the source
    res3 = analyse(load_run(root / "run"), [str(data / "words_a.txt"), str(data / "words_b.txt")], split="all")
    assert max(lay["domain_dependence"] for lay in res3["layers"]) < 0.05


class RouterInputs:
    """The MoE layers' inputs, read by a forward pre-hook: the test's own view of the routing."""

    def __init__(self, model):
        self.model, self.h = model, {}
        self.handles = [layer.ffn.register_forward_pre_hook(self._hook(i))
                        for i, layer in enumerate(model.layers) if layer.is_moe]

    def _hook(self, i):
        def fn(_mod, args):
            self.h[i] = args[0].reshape(-1, args[0].shape[-1]).float()
        return fn

    def topk(self, tokens, router_model=None):
        """Per MoE layer: top-k expert sets (T, K, sorted) of `router_model`'s routers (default this model's) on this
        model's router inputs."""
        router_model = router_model or self.model
        with torch.no_grad():
            self.model(tokens)
            out = {}
            for i, h in self.h.items():
                w = router_model.layers[i].ffn.router.weight.float()
                k = router_model.cfg.moe.top_k
                out[i] = torch.topk(F.linear(h, w), k, dim=-1).indices.sort(-1).values
        return out


def _changed(a_model, b_model, batches, same_inputs=False):
    """Per layer: the share of tokens whose top-k set differs between the two models (with `same_inputs`: B's routers
    on A's router inputs)."""
    ra, rb = RouterInputs(a_model), RouterInputs(b_model)
    diff, n = {}, 0
    for b in batches:
        ka = ra.topk(b.tokens_BS)
        kb = ra.topk(b.tokens_BS, b_model) if same_inputs else rb.topk(b.tokens_BS)
        n += b.tokens_BS.numel()
        for i in ka:
            diff[i] = diff.get(i, 0) + int((ka[i] != kb[i]).any(-1).sum())
    return {i: v / n for i, v in diff.items()}


def test_stability_between_checkpoints_counts_changed_tokens(trained):
    root, data = trained
    late, early = load_run(root / "run"), load_run(root / "run" / "checkpoints" / "step-000200")
    src = [str(data / "digits.txt"), str(data / "words.txt")]
    same = analyse(late, src, earlier=load_run(root / "run"), split="all", max_tokens=5000)
    assert all(s["topk_changed"] == 0 and s["top1_changed"] == 0 and s["usage_js_bits"] == 0
               for s in same["stability"])
    res = analyse(late, src, earlier=early, split="all", max_tokens=5000)
    batches = list(domain_batches(src, late, "all", 5000, 64, []))
    want = _changed(early.model, late.model, batches)
    got = {s["layer"]: s["topk_changed"] for s in res["stability"]}
    assert got == pytest.approx(want, abs=1e-12) and max(got.values()) > 0


@pytest.fixture(scope="module")
def tuned(trained):
    root, data = trained
    sets = ["train.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=2", "train.eval_every=30",
            "train.ckpt_every=30", "finetune.train_examples=150"]
    for recipe in ("freeze-router", "full"):
        finetune(str(root / "run"), str(data / "shifted.jsonl"), root / recipe, recipe, steps=30, overrides=sets,
                 overwrite=True, quiet=True)
    return root, data


def test_drift_is_zero_with_the_router_frozen_and_recomputed_from_logits(tuned, tmp_path, capsys):
    root, data = tuned
    src = [str(data / "words.txt")]
    base = load_run(root / "run")
    for recipe in ("freeze-router", "full"):
        tuned_run = load_run(root / recipe)
        res = analyse(tuned_run, src, base=base, split="all", max_tokens=4000)
        batches = list(domain_batches(src, tuned_run, "all", 4000, 64, []))
        router = {d["layer"]: d["router"]["topk_changed"] for d in res["drift"]}
        total = {d["layer"]: d["total"]["topk_changed"] for d in res["drift"]}
        assert router == pytest.approx(_changed(base.model, tuned_run.model, batches, same_inputs=True), abs=1e-12)
        assert total == pytest.approx(_changed(base.model, tuned_run.model, batches), abs=1e-12)
        if recipe == "freeze-router":
            assert all(v == 0 for v in router.values())
        else:
            assert max(router.values()) > 0
    out = tmp_path / "drift"
    _, stdout, _ = run_main(capsys, "experts", root / "run", root / "freeze-router", "--data", src[0],
                            "--split", "all", "--tokens", "4000", "--out", out)
    res = json.loads((out / "experts.json").read_text())
    assert res["base"].startswith(str(root / "run")) and "did not move" in res["advice"]
    assert res["advice"] in stdout


def test_an_imported_hugging_face_model_routes_as_the_run_it_came_from(trained, tmp_path, capsys):
    _, data = trained
    run_main(capsys, "train", "tiny-moe", "--data", data / "mix.jsonl", "--out", tmp_path / "run", "--steps", "3",
             "--quiet", *TINY_MOE)
    run_main(capsys, "export", tmp_path / "run", "--out", tmp_path / "hf")  # a Mixtral folder, tokenizer included
    run_main(capsys, "import", tmp_path / "hf", "--out", tmp_path / "imported")
    src = [str(data / "digits.txt"), str(data / "words.txt")]
    a = analyse(load_run(tmp_path / "run"), src, split="all", max_tokens=3000)
    b = analyse(load_run(tmp_path / "imported"), src, split="all", max_tokens=3000)
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        assert lb["share"] == pytest.approx(la["share"], abs=1e-3)
        assert np.array(lb["domain_share"]) == pytest.approx(np.array(la["domain_share"]), abs=1e-3)


def test_a_frozen_router_keeps_its_balancing_bias():
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8,
                      moe=MoEConfig(d_model=16, d_expert=8, n_experts=4, top_k=1, bias_update_rate=0.1))
    loads = [torch.tensor([9.0, 1.0, 1.0, 1.0])]
    for recipe, moves in (("freeze-router", False), ("experts-only", False), ("full", True)):
        model = Transformer(cfg)
        apply_recipe(model, recipe)
        model.update_router_biases(loads)
        assert bool(model.moe_layers()[0].router.bias.abs().sum() > 0) == moves, recipe


def test_a_tokenized_dataset_routes_as_its_text(trained, tmp_path, capsys):
    root, data = trained
    src = tmp_path / "words3.txt"  # enough lines for two documents, so the dataset has a split
    src.write_text(((data / "words.txt").read_text() + "\n") * 3)
    run_main(capsys, "tokenize", src, "--out", tmp_path / "ds", "--tokenizer", root / "run", "--quiet")
    run = load_run(root / "run")
    text = analyse(run, [str(src)], split="all", max_tokens=3000)
    ds = analyse(run, [str(tmp_path / "ds")], split="all", max_tokens=3000)
    assert list(ds["tokens"].values()) == list(text["tokens"].values())
    assert [lay["share"] for lay in ds["layers"]] == [lay["share"] for lay in text["layers"]]


def test_the_default_report_folder_is_beside_the_run_never_inside(trained, capsys):
    root, data = trained
    before = sorted(p.name for p in (root / "run" / "checkpoints").iterdir())
    run_main(capsys, "experts", root / "run" / "checkpoints" / "step-000200", "--data", data / "words.txt",
             "--split", "all", "--tokens", "500")
    assert (root / "run-experts-step-000200" / "experts.json").is_file()
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == before


def test_bad_input_gets_one_line(trained, tmp_path, capsys):
    root, data = trained
    dense = tmp_path / "dense"
    run_main(capsys, "train", "tiny-dense", "--data", data / "mix.jsonl", "--out", dense, "--steps", "1", "--quiet",
             *TINY)
    other = tmp_path / "other"
    run_main(capsys, "train", "tiny-moe", "--data", data / "mix.jsonl", "--out", other, "--steps", "1", "--quiet",
             *MODEL[:-1], "model.moe.n_experts=4")
    # a second domain that is one document the run's split keeps for training: under --split val it has no text to
    # route, and the report must say so instead of speaking of one domain
    from moelab.data.sources import iter_documents, is_validation

    single = next(tmp_path / f"glosses{i}.txt" for i in range(100)
                  if not is_validation(str(tmp_path / f"glosses{i}.txt"), 0.05))  # fmt: skip
    single.write_text((data / "digits.txt").read_text().splitlines()[0] + "\n")
    assert len(list(iter_documents(str(single), "text"))) == 1
    cases = [
        ((root / "run", "--data", f"{data / 'mix.jsonl'},{single}"), f"{single} has no held-out documents"),
        ((dense, "--data", data / "words.txt"), "is a dense model (no MoE layer)"),
        ((root / "run", other, "--data", data / "words.txt"), "differ in architecture (n_experts 2 vs 4)"),
        ((root / "run", "--data", f"{data / 'words.txt'},{tmp_path / 'missing.txt'}"), "does not exist"),
        ((root / "run", "--data", data / "words.txt", "--since", "7"), "--since 7"),
    ]
    for args, words in cases:
        rc, _, err = run_main(capsys, "experts", *args, "--out", tmp_path / "x", check=False)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert rc != 0 and len(lines) == 1 and words in lines[0], err
        assert not (tmp_path / "x").exists()
    # with --split all the same two sources are two domains
    run_main(capsys, "experts", root / "run", "--data", f"{data / 'words.txt'},{single}", "--split", "all", "--out",
             tmp_path / "y", "--tokens", "500")
    assert json.loads((tmp_path / "y" / "experts.json").read_text())["domains"] == ["words.txt", single.name]
