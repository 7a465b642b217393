"""An imported model's own chat template: rendered as transformers renders it, assistant
turns found prefix by prefix, carried through fine-tuning and export."""
import json

import pytest
import transformers

from conftest import TINY_MOE, run_cli, run_main
from moelab import ConfigError
from moelab.data.chat import ChatFormat, load_chat_format
from moelab.data.sft import SFTExamples, read_sft_jsonl
from moelab.store.run import load_run

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVO = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "add 2 and 3"},
         {"role": "assistant", "content": "5"}, {"role": "user", "content": "and times 4?"},
         {"role": "assistant", "content": "20"}]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A moelab run exported to HF, given a chat template there, imported back."""
    tmp = tmp_path_factory.mktemp("chat")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"line {i}: add {i} and {i + 1} is {2 * i + 1}.\n" for i in range(1200)))
    run_cli("train", "tiny-moe", "--data", str(corpus), "--out", str(tmp / "run"), "--steps", "2", "--quiet",
            *TINY_MOE, "model.max_seq_len=256", "data.seq_len=256")
    run_cli("export", str(tmp / "run"), "--out", str(tmp / "hf"))
    cfg_file = tmp / "hf" / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "chat_template": CHATML}))
    run_cli("import", str(tmp / "hf"), "--out", str(tmp / "imp"))
    chat = tmp / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": CONVO}) + "\n" for _ in range(12)))
    return tmp


def test_renders_like_transformers_and_trains_only_replies(imported):
    hf_tok = transformers.AutoTokenizer.from_pretrained(imported / "hf")
    fmt = load_chat_format(imported / "imp")
    assert fmt.template == CHATML and fmt.eos_token == "<|endoftext|>"
    segs = fmt.chat(CONVO, "test")
    assert "".join(t for t, _ in segs) == hf_tok.apply_chat_template(CONVO, tokenize=False)
    assert [t for t, trained in segs if trained] == ["5<|endoftext|>\n", "20<|endoftext|>\n"]
    # token ids equal the HF tokenizer's on the whole text, so piecewise encoding changed nothing
    ex = read_sft_jsonl(imported / "chat.jsonl", fmt)
    rows = SFTExamples(ex[:1], load_run(imported / "imp").need_tokenizer(), 256, fmt.eos_token).rows
    whole = hf_tok(hf_tok.apply_chat_template(CONVO, tokenize=False), add_special_tokens=False).input_ids
    assert rows[0][0].tolist() == whole[:257]
    assert load_chat_format(imported / "imp", "moelab").template is None


def test_template_that_does_not_extend_its_prefixes_is_refused():
    last_first = "{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="chat_template=moelab"):
        ChatFormat(last_first, "<|endoftext|>").chat(CONVO, "x.jsonl:1")
    with pytest.raises(ConfigError, match="finetune.chat_template"):
        load_chat_format(None, "chatml")


def test_finetune_uses_and_keeps_the_template(imported, capsys):
    out = imported / "ft"
    _, _, err = run_main(capsys, "finetune", str(imported / "imp"), "--data", str(imported / "chat.jsonl"), "--out",
                        str(out), "--recipe", "full", "--steps", "2", "--quiet")
    assert "chat format (for messages examples): the chat template of" in err
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    run_main(capsys, "export", str(out), "--out", str(imported / "hf2"))
    hf2 = transformers.AutoTokenizer.from_pretrained(imported / "hf2")
    ours = "".join(t for t, _ in load_chat_format(out).chat(CONVO, "x"))
    assert hf2.apply_chat_template(CONVO, tokenize=False) == ours and ours.count("<|im_start|>") == 5
    _, _, err = run_main(capsys, "finetune", str(imported / "imp"), "--data", str(imported / "chat.jsonl"), "--out",
                        str(imported / "ft2"), "--recipe", "full", "--steps", "1", "--quiet",
                        "finetune.chat_template=moelab")
    assert "chat format (for messages examples): moelab's plain-text chat template" in err
