"""Quality of a (quantized) causal LM — it is evaluated as a plain Hugging Face module.

- ``sources``: text sources for perplexity (WikiText-2, the study's C4 windows, Austen, files)
- ``perplexity``: windowed perplexity, plus KL divergence and top-1 agreement with a reference
- ``multiple_choice``: zero-shot log-likelihood tasks (ARC, OBQA, PIQA, HellaSwag, WinoGrande, BoolQ)
- ``mmlu``: 5-shot MMLU, next-token prediction over " A".." D"
- ``lm_eval_adapter``: any lm-evaluation-harness task on our models (optional ``lm-eval`` extra)
"""
