"""lm-evaluation-harness interop: a custom task on a local JSON file, run through lm-eval with our
adapter, gives exactly our own multiple-choice numbers. Skipped when lm-eval is not installed."""

from __future__ import annotations

import json

import pytest
import torch

from qwenquant.eval import multiple_choice as mc
from tests.test_eval import byte_tokenizer, tiny_model

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """\
task: toy_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""

DOCS = [
    {"question": "Which is a fruit?", "choices": {"text": ["apple", "stone", "a long metal bar", "car"],
                                                  "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"question": "What is hot?", "choices": {"text": ["ice", "snow", "the sun", "cold water"],
                                             "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"question": "Where do fish live?", "choices": {"text": ["in trees", "in water", "on the moon", "in sand"],
                                                    "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"question": "What do bees make?", "choices": {"text": ["honey", "milk", "steel", "paper"],
                                                   "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
]


@pytest.mark.slow
def test_lm_eval_custom_task_matches_our_scoring(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from qwenquant.eval.lm_eval_adapter import lm_eval_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_arc.yaml").write_text(TASK_YAML.format(data=data))

    model, tok = tiny_model(), byte_tokenizer()
    lm = lm_eval_model(model, tok, batch_size=4)
    out = simple_evaluate(model=lm, tasks=["toy_arc"], task_manager=TaskManager(include_path=str(tasks)),
                          log_samples=False)
    theirs = out["results"]["toy_arc"]

    ours = mc.score_items(model, tok, [mc.arc_item(d) for d in DOCS], progress=False)
    assert theirs["acc,none"] == ours["acc"]
    assert theirs["acc_norm,none"] == ours["acc_norm"]

    # loglikelihood_rolling over a text longer than the context equals the windowed sum we compute directly
    text = "Question: what is hot? Answer: the sun. " * 6  # 240 byte tokens > max_length 128
    req = type("Req", (), {"args": (text,)})()
    (rolling,) = lm.loglikelihood_rolling([req], disable_tqdm=True)
    toks = tok.encode(text)
    n = len(toks)
    assert 128 < n <= 256
    with torch.no_grad():
        # window 1: EOS + toks[:127] predicts toks[0:128]
        lp = torch.log_softmax(model(torch.tensor([[tok.eos_token_id] + toks[:127]])).logits[0].double(), -1)
        total = sum(float(lp[p, toks[p]]) for p in range(128))
        # window 2: the 128 tokens before the last predict the n - 128 tokens not yet scored
        start = n - 129
        lp = torch.log_softmax(model(torch.tensor([toks[start : n - 1]])).logits[0].double(), -1)
        total += sum(float(lp[t - 1 - start, toks[t]]) for t in range(128, n))
    assert rolling == pytest.approx(total, abs=1e-3)


def test_adapter_generate_until():
    from qwenquant.eval.lm_eval_adapter import lm_eval_model

    model, tok = tiny_model(), byte_tokenizer()
    lm = lm_eval_model(model, tok)
    req = type("Req", (), {"args": ("The capital of France is", {"until": ["\n\n"], "max_gen_toks": 5})})()
    (text,) = lm.generate_until([req])
    ids = tok.encode("The capital of France is")
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert text == tok.decode(ids[-5:]).split("\n\n")[0]
