"""qwenquant: quantize Qwen3 with RTN, GPTQ, AWQ, SmoothQuant and BiLLM; evaluate; measure honestly."""

__version__ = "0.1.0"
