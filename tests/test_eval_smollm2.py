"""Reduced real checks on SmolLM2-135M (fp32, CPU): perplexity on Austen held-out and ARC-Easy
accuracy above chance. The full-size protocol runs are marked ``slow``."""

from __future__ import annotations

import pytest
import torch

from qwenquant.eval import mmlu, multiple_choice as mc, sources
from qwenquant.eval.perplexity import PerplexityConfig, evaluate_perplexity


@pytest.fixture(scope="module")
def smollm2():
    from qwenquant.model.load import load_hf_model

    model, tok, _ = load_hf_model("smollm2")
    return model, tok


@pytest.fixture(scope="module")
def austen_ids(smollm2):
    return sources.load_token_stream("austen", smollm2[1])


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine oversubscribed threads stall small forwards ~8x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smollm2_austen_perplexity_two_short_windows(smollm2, austen_ids, one_thread):
    model, _ = smollm2
    res = evaluate_perplexity(model, austen_ids, PerplexityConfig(seqlen=512, max_windows=2), progress=False)
    assert res.windows == 2 and res.tokens == 2 * 511
    # fp32 on CPU, measured once (2026-11): pins the windowing, tokenization and scoring end to end
    assert res.ppl == pytest.approx(19.1725, rel=1e-3)


def test_smollm2_arc_easy_above_chance(smollm2, one_thread):
    model, tok = smollm2
    if not (sources.data_root() / "mmlu" / "auxiliary_train" / "arc_easy.csv").is_file():
        pytest.skip("no shared ARC-Easy data")
    res = mc.evaluate_task(model, tok, "arc_easy", limit=40, shared_prefix=True, progress=False)
    assert res.n == 40
    assert res.acc >= 0.4  # chance is 0.25; stderr at n=40 is ~0.08
    assert (res.acc, res.acc_norm) == (18 / 40, 15 / 40)  # measured once, fp32 CPU


def test_smollm2_mmlu_answer_tokens(smollm2):
    tok = smollm2[1]
    ids = mmlu.answer_token_ids(tok)
    assert [tok.convert_ids_to_tokens(i) for i in ids] == ["ĠA", "ĠB", "ĠC", "ĠD"]


@pytest.mark.slow
def test_smollm2_first_pride_and_prejudice_window(smollm2, austen_ids):
    """FIXTURES.md measured ~17.6 on the first 2,048 tokens of Pride and Prejudice (fp32)."""
    model, _ = smollm2
    res = evaluate_perplexity(model, austen_ids, PerplexityConfig(seqlen=2048, max_windows=1), progress=False)
    assert res.ppl == pytest.approx(17.6, rel=0.05)


@pytest.mark.slow
def test_smollm2_kl_self_zero(smollm2, austen_ids):
    model, _ = smollm2
    res = evaluate_perplexity(model, austen_ids, PerplexityConfig(seqlen=256, max_windows=1), reference=model,
                              progress=False)
    assert res.agreement.kl_max == 0.0 and res.agreement.top1_agreement == 1.0
