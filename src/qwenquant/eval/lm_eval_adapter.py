"""lm-evaluation-harness interop: run any lm-eval task on a qwenquant model (optional extra ``lm-eval``).

``lm_eval_model(model, tokenizer)`` wraps a causal LM (quantized or not — to us it is the same
kind of module) as an ``lm_eval.api.model.LM``, so the harness's own task definitions and metrics
apply unchanged::

    import lm_eval
    lm = lm_eval_model(model, tokenizer, batch_size=16)
    out = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

The three request types map onto this package's scoring:

- ``loglikelihood(context, continuation)``: :func:`multiple_choice.score_token_pairs`, with
  lm-eval's ``_encode_pair`` split; an empty context is replaced by the EOS token, as lm-eval does.
- ``loglikelihood_rolling(text)``: lm-eval's own rolling windows (``get_rolling_token_windows``,
  window = the model's context, one prefix token), summed.
- ``generate_until(context, {until, max_gen_toks})``: greedy decoding via ``model.generate``, cut
  at the first stop string.

So our multiple-choice numbers and lm-eval's on the same data agree exactly (tested). lm-eval is
imported only when the wrapper is built; without it a clear error says how to install it.
"""

from __future__ import annotations

import functools

import torch

from qwenquant.eval.multiple_choice import context_limit, encode_pair, score_token_pairs
from qwenquant.eval.perplexity import model_device

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'qwenquant[lm-eval]' (or pip install lm-eval)"


def _require_lm_eval():
    try:
        import lm_eval.api.model
        import lm_eval.utils
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(INSTALL_HINT) from e
    return lm_eval


@functools.cache
def _adapter_class():
    lm_eval = _require_lm_eval()

    class QwenquantLM(lm_eval.api.model.LM):
        """An lm-eval ``LM`` over a Hugging Face-style causal LM held in memory."""

        def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                     max_gen_toks: int = 256):
            super().__init__()
            self.model, self.tokenizer = model, tokenizer
            self.batch_size = batch_size
            self.max_length = max_length or context_limit(model)
            self.max_gen_toks = max_gen_toks
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
            if eos is None:
                raise ValueError("tokenizer has neither an EOS nor a BOS token to stand in for an empty context")
            self.prefix_token_id = eos
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

        def _pairs(self, requests):
            pairs = []
            for req in requests:
                context, continuation = req.args
                if context == "":
                    cont = self.tokenizer.encode(continuation, add_special_tokens=False)
                    pairs.append(([self.prefix_token_id], cont))
                else:
                    pairs.append(encode_pair(self.tokenizer, context, continuation))
            return pairs

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return score_token_pairs(self.model, self._pairs(requests), batch_size=self.batch_size,
                                     max_length=self.max_length, progress=not disable_tqdm, pad_id=self.pad_id)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                (text,) = req.args
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                windows = [
                    lm_eval.utils.make_disjoint_window(w)
                    for w in lm_eval.utils.get_rolling_token_windows(
                        token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                    )
                ]
                scores = score_token_pairs(self.model, windows, batch_size=self.batch_size,
                                           max_length=self.max_length, pad_id=self.pad_id)
                out.append(sum(ll for ll, _ in scores))
            return out

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            device = model_device(self.model)
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = kwargs.get("max_gen_toks", self.max_gen_toks)
                ids = self.tokenizer.encode(context, add_special_tokens=False)[-(self.max_length - max_new):]
                gen = self.model.generate(
                    torch.tensor([ids], device=device), max_new_tokens=max_new, do_sample=False,
                    pad_token_id=self.pad_id, attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                )
                text = self.tokenizer.decode(gen[0, len(ids):].tolist(), skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return QwenquantLM


def lm_eval_model(model: torch.nn.Module, tokenizer, batch_size: int = 16, max_length: int | None = None):
    """An ``lm_eval.api.model.LM`` scoring with ``model`` (needs the ``lm-eval`` extra)."""
    return _adapter_class()(model, tokenizer, batch_size=batch_size, max_length=max_length)
