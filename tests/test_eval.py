"""Evaluation: perplexity windowing, C4 window selection, KL/top-1, MC and MMLU scoring — each
checked against a direct computation on a tiny random Qwen3 with a byte-level tokenizer."""

from __future__ import annotations

import copy
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwenquant.eval import mmlu, multiple_choice as mc, sources
from qwenquant.eval.perplexity import PerplexityConfig, evaluate_perplexity, make_windows
from qwenquant.eval.sources import TokenStream


def byte_tokenizer(answer_merges: bool = True):
    """Byte-level BPE: 256 byte tokens plus merges for " A".." D" (so MMLU answers are one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", letter) for letter in "ABCD"] if answer_merges else []
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="Ċ")  # EOS = the newline byte


def tiny_model(seed: int = 0, vocab: int = 260, max_pos: int = 128):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=max_pos)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: sharper, less uniform predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 6


# ------------------------------------------------------------------------------------ perplexity

def test_windows_drop_remainder_and_limit():
    ids = torch.arange(103)
    w = make_windows(ids, 10)
    assert w.shape == (10, 10) and torch.equal(w[3], torch.arange(30, 40))
    assert make_windows(ids, 10, max_windows=4).shape == (4, 10)
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(torch.arange(5), 10)


def test_perplexity_matches_direct_computation(model, tok):
    stream = TokenStream("t", sources.encode(tok, TEXT), "inline")
    seqlen = 64
    res = evaluate_perplexity(model, stream, PerplexityConfig(seqlen=seqlen, batch_size=2), progress=False)
    n = stream.ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for w in range(n):
            x = stream.ids[w * seqlen : (w + 1) * seqlen][None]
            logits = model(x).logits[0, :-1]
            nlls.append(F.cross_entropy(logits.double(), x[0, 1:], reduction="sum"))
    direct = float(sum(nlls)) / (n * (seqlen - 1))
    assert res.windows == n and res.tokens == n * (seqlen - 1)
    assert res.nll == pytest.approx(direct, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(direct), rel=1e-6)
    # max_windows takes the first windows only
    res2 = evaluate_perplexity(model, stream, PerplexityConfig(seqlen=seqlen, max_windows=2), progress=False)
    assert res2.nll == pytest.approx(float(nlls[0] + nlls[1]) / (2 * (seqlen - 1)), rel=1e-6)


def test_kl_self_is_zero_and_perturbed_is_positive(model, tok):
    stream = TokenStream("t", sources.encode(tok, TEXT), "inline")
    cfg = PerplexityConfig(seqlen=64, max_windows=3)
    same = evaluate_perplexity(model, stream, cfg, reference=model, progress=False)
    assert same.agreement.kl_mean == 0.0 and same.agreement.kl_max == 0.0
    assert same.agreement.top1_agreement == 1.0

    noisy = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in noisy.model.layers.parameters():
            p.add_(0.1 * torch.randn_like(p))
    res = evaluate_perplexity(noisy, stream, cfg, reference=model, progress=False)
    a = res.agreement
    # direct KL(P_ref || P_q) on the same positions
    with torch.no_grad():
        x = stream.ids[: 3 * 64].view(3, 64)
        ref = F.log_softmax(model(x).logits[:, :-1].double(), -1)
        q = F.log_softmax(noisy(x).logits[:, :-1].double(), -1)
        kl = (ref.exp() * (ref - q)).sum(-1).flatten()
        agree = (ref.argmax(-1) == q.argmax(-1)).double().mean()
    assert a.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert a.kl_max == pytest.approx(float(kl.max()), rel=1e-4)
    assert a.kl_p50 == pytest.approx(float(torch.quantile(kl, 0.5)), rel=1e-4)
    assert a.kl_mean > 0 and a.kl_p50 <= a.kl_p90 <= a.kl_p99 <= a.kl_max
    assert a.top1_agreement == pytest.approx(float(agree)) and a.top1_agreement < 1.0


def test_seqlen_beyond_context_is_refused(model, tok):
    stream = TokenStream("t", sources.encode(tok, TEXT), "inline")
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        evaluate_perplexity(model, stream, PerplexityConfig(seqlen=256), progress=False)


# ----------------------------------------------------------------------------------------- sources

def test_c4_windows_select_documents_and_offsets(tmp_path, tok):
    """Synthetic shard: the windows must be exactly ids[offset:offset+W] of the listed line numbers."""
    docs = [f"document {i}: " + "".join(chr(97 + (i * 7 + j) % 26) for j in range(60 + i)) for i in range(8)]
    shard = tmp_path / "shard.json.gz"
    with gzip.open(shard, "wt") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "url": "u", "timestamp": "t"}) + "\n")
    windows = sources.C4Windows(doc_indices=(5, 2, 5), token_offsets=(3, 0, 10), window=16)
    ids = sources.c4_window_ids(shard, tok, windows)
    expect = [tok.encode(docs[5])[3:19], tok.encode(docs[2])[0:16], tok.encode(docs[5])[10:26]]
    assert ids.tolist() == sum(expect, [])
    too_far = sources.C4Windows(doc_indices=(1,), token_offsets=(60,), window=16)
    with pytest.raises(ValueError, match="too few for the window"):
        sources.c4_window_ids(shard, tok, too_far)
    with pytest.raises(ValueError, match="fewer documents"):
        sources.c4_window_ids(shard, tok, sources.C4Windows((9,), (0,), 16))


def test_shipped_c4_windows_file():
    w = sources.c4_windows()
    assert len(w.doc_indices) == len(w.token_offsets) == 256 and w.window == 2048
    assert w.doc_indices[:3] == (25247, 31845, 23465) and w.token_offsets[:3] == (388, 829, 597)


def test_text_file_formats(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "c.json").write_text('[{"text": "one"}, {"text": "two"}]')
    assert sources.read_text_file(tmp_path / "a.txt") == "hello world"
    assert sources.read_text_file(tmp_path / "b.jsonl") == "one\n\ntwo"
    assert sources.read_text_file(tmp_path / "c.json") == "one\n\ntwo"
    s = sources.load_token_stream(str(tmp_path / "a.txt"), tok)
    assert s.ids.tolist() == tok.encode("hello world") and s.name == "a.txt"
    s = sources.load_token_stream(f"wikitext2={tmp_path / 'b.jsonl'}", tok)
    assert s.name == "wikitext2" and s.ids.tolist() == tok.encode("one\n\ntwo")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="row 0 has no 'text'"):
        sources.read_text_file(tmp_path / "bad.jsonl")


def test_bad_sources(tmp_path, tok):
    with pytest.raises(ValueError, match="unknown perplexity source 'wikitext3'.*wikitext2, c4, austen"):
        sources.load_token_stream("wikitext3", tok)
    with pytest.raises(FileNotFoundError, match="no such file"):
        sources.load_token_stream(f"c4={tmp_path / 'missing.json.gz'}", tok)


# ---------------------------------------------------------------------------------- multiple choice

def _direct_loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx):]
    x = torch.tensor([whole])
    with torch.no_grad():
        logp = F.log_softmax(model(x).logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + t, tok_id]) for t, tok_id in enumerate(cont))


def _write_csv(path: Path, rows):
    import csv

    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_mc_scores_match_direct_logprobs(tmp_path, model, tok):
    rows = [["Which is a fruit?", "apple", "stone", "a very long piece of metal", "car", "A"],
            ["What is hot?", "ice", "snow", "the sun", "cold water", "C"]]
    _write_csv(tmp_path / "arc.csv", rows)
    docs = mc.read_choice_csv(tmp_path / "arc.csv")
    items = [mc.arc_item(d) for d in docs]
    assert items[0].requests[1] == ("Question: Which is a fruit?\nAnswer:", " stone")
    assert items[1].gold == 2

    got = mc.score_requests(model, tok, [r for it in items for r in it.requests], batch_size=3)
    direct = [_direct_loglik(model, tok, c, x) for it in items for c, x in it.requests]
    assert [g for g, _ in got] == pytest.approx(direct, abs=1e-4)

    # metrics from the direct numbers
    acc = acc_norm = 0
    for i, it in enumerate(items):
        lls = direct[4 * i : 4 * i + 4]
        acc += max(range(4), key=lambda j: lls[j]) == it.gold
        acc_norm += max(range(4), key=lambda j: lls[j] / len(it.choices[j])) == it.gold
    m = mc.score_items(model, tok, items, batch_size=5, progress=False)
    assert m["acc"] == acc / 2 and m["acc_norm"] == acc_norm / 2

    # the KV-cache path (each context once) gives the same numbers
    shared = mc.score_requests(model, tok, [r for it in items for r in it.requests], shared_prefix=True)
    assert [g for g, _ in shared] == pytest.approx(direct, abs=1e-4)
    assert [g for _, g in shared] == [g for _, g in got]
    assert mc.score_items(model, tok, items, shared_prefix=True, progress=False) == m


def test_encode_pair_moves_trailing_space(tok):
    ctx, cont = mc.encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes")


def test_winogrande_partial_scoring():
    item = mc.winogrande_item({"sentence": "The cup beat the jug because _ was harder.",
                               "option1": "the cup", "option2": "the jug", "answer": "2"})
    assert item.requests == (("The cup beat the jug because the cup", " was harder."),
                             ("The cup beat the jug because the jug", " was harder."))
    assert item.gold == 1


def test_task_loading_limit_and_errors(tmp_path):
    rows = [[f"q{i}", "a", "b", "c", "d", "ABCD"[i % 4]] for i in range(10)]
    aux = tmp_path / "mmlu" / "auxiliary_train"
    aux.mkdir(parents=True)
    _write_csv(aux / "obqa.csv", rows)
    items, origin = mc.load_task_items("openbookqa", tmp_path)
    assert len(items) == 10 and origin.endswith("obqa.csv")
    assert items[0].requests[0] == ("q0", " a")  # OBQA: the bare question stem, as lm-eval
    assert mc.select(items, 3) == items[:3]
    sample = mc.select(items, 3, seed=0)
    assert sample == mc.select(items, 3, seed=0) and len(sample) == 3
    with pytest.raises(ValueError, match="unknown task 'arc_medium'.*arc_easy"):
        mc.load_task_items("arc_medium", tmp_path)
    with pytest.raises(FileNotFoundError, match="no local data for task 'piqa'"):
        mc.load_task_items("piqa", tmp_path, source="local")
    _write_csv(aux / "arc_easy.csv", rows[:2] + [["q", "a", "b", "c", "E"]])
    with pytest.raises(ValueError, match=r"arc_easy.csv:3: malformed row"):
        mc.load_task_items("arc_easy", tmp_path)


def test_real_csvs_parse():
    root = sources.data_root()
    if not (root / "mmlu" / "auxiliary_train" / "arc_easy.csv").is_file():
        pytest.skip(f"no shared data at {root}")
    for task, n in (("arc_easy", 2242), ("openbookqa", 4956)):
        items, _ = mc.load_task_items(task, root, source="local")
        assert len(items) > 0.9 * n


# ------------------------------------------------------------------------------------------- MMLU

def test_mmlu_prompt_and_shot_dropping(tok):
    shots = [(f"shot question {i} " + "x" * 40, "a", "b", "c", "d", "B") for i in range(5)]
    q = ("What?", "one", "two", "three", "four", "C")
    p = mmlu.build_prompt("high_school_physics", shots, q, 2)
    assert p == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                 f"{shots[0][0]}\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                 f"{shots[1][0]}\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                 "What?\nA. one\nB. two\nC. three\nD. four\nAnswer:")
    full = len(tok.encode(mmlu.build_prompt("s", shots, q, 5)))
    three = len(tok.encode(mmlu.build_prompt("s", shots, q, 3)))
    ids, k = mmlu.fit_prompt(tok, "s", shots, q, 5, max_length=three)
    assert k == 3 and len(ids) == three < full
    ids, k = mmlu.fit_prompt(tok, "s", shots, q, 5, max_length=full)
    assert k == 5
    with pytest.raises(ValueError, match="question alone"):
        mmlu.fit_prompt(tok, "s", shots, q, 5, max_length=10)


def test_mmlu_answer_tokens(tok):
    ids = mmlu.answer_token_ids(tok)
    assert ids == [tok.convert_tokens_to_ids("Ġ" + letter) for letter in "ABCD"]
    plain = byte_tokenizer(answer_merges=False)  # " A" -> ["Ġ", "A"]
    with pytest.raises(ValueError, match="not one token"):
        mmlu.answer_token_ids(plain)


def test_mmlu_end_to_end_matches_direct(tmp_path, model, tok):
    root = tmp_path / "mmlu"
    (root / "dev").mkdir(parents=True)
    (root / "test").mkdir()
    shots = [[f"dev {i}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(5)]
    tests = [[f"test {i}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(6)]
    _write_csv(root / "dev" / "toy_subject_dev.csv", shots)
    _write_csv(root / "test" / "toy_subject_test.csv", tests)
    res = mmlu.evaluate_mmlu(model, tok, mmlu.MMLUConfig(max_length=120, batch_size=4), data_dir=tmp_path,
                             progress=False)
    answer = mmlu.answer_token_ids(tok)
    correct = 0
    with torch.no_grad():
        for row in tests:
            ids, _ = mmlu.fit_prompt(tok, "toy_subject", [tuple(s) for s in shots], tuple(row), 5, 120)
            logits = model(torch.tensor([ids])).logits[0, -1, answer]
            correct += int(logits.argmax()) == "ABCD".index(row[5])
    assert res.n == 6 and res.accuracy == correct / 6
    assert res.subjects["toy_subject"]["n"] == 6
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        mmlu.evaluate_mmlu(model, tok, mmlu.MMLUConfig(subjects=("nope",)), data_dir=tmp_path, progress=False)


def test_mmlu_shared_prefix_gives_the_direct_predictions(model):
    """The KV-cached common prefix + batched suffixes predict what whole prompts predict."""
    g = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (40,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 12, (7,), generator=g)]
    answer = [5, 6, 7, 8]
    assert mmlu.common_prefix_length(prompts) >= 40
    assert mmlu.common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # one token always left to predict from
    assert mmlu.common_prefix_length([[1, 2], [3, 4]]) == 0
    direct = mmlu.predict(model, prompts, answer, batch_size=16)
    assert mmlu.predict_shared_prefix(model, prompts, answer, batch_size=3) == direct
    with torch.no_grad():  # one prompt at a time, no padding: the plain definition
        one_by_one = [int(model(torch.tensor([p])).logits[0, -1, answer].argmax()) for p in prompts]
    assert direct == one_by_one and len(set(direct)) > 1  # not a degenerate always-the-same answer
