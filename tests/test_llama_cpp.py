"""Every kind of GGUF that export.py writes, run by llama.cpp itself (llama-cpp-python) against phi3skip's own
logits for the same skip set: the full model and plain skip sets (`phi3` architecture), bypassed skip sets (`deci`),
tied and untied embeddings, f32 within float error, f16 / bf16 / q8_0 by perplexity; and the real SmolLM2 student.

Inside llama.cpp's rules: it runs phi3 without the sliding window (sequences here stay inside the windows) and picks
LongRoPE's factors by its context size, at least 256 tokens here, so the long factors (compared with phi3skip's
long_rope=True); its deci architecture has neither, and refuses both (one line)."""
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's binding: pip install llama-cpp-python")
pytest.importorskip("gguf")

import phi3skip  # noqa: E402
from phi3skip.model import bypass
from phi3skip.train import bypass_init
from phi3skip.eval import llamacpp
from phi3skip.core.cli import UserError
from phi3skip.eval.evaluate import perplexity_ci
from phi3skip.formats.export import export
from test_export_gguf import PROFILE, VARIANTS, student, tokenizers  # noqa: E402,F401  (tokenizers: a fixture)

T = 20
NO_DECI = {"mini-128k-su": "LongRoPE", "phi3.5-longrope": "LongRoPE", "phi4-mini": "LongRoPE"}


def with_bypasses(tmp_path: Path, variant: str, tok: Path, mlp: int = 16, seed: int = 0,
                  tied: bool | None = None) -> tuple[Path, object]:
    """A student whose layers 2 and 0 run random (nonzero) sequential bypasses when skipped."""
    folder, _ = student(tmp_path, variant, tok, seed=seed,
                        **({} if tied is None else {"tie_word_embeddings": tied}))
    model = phi3skip.from_pretrained(folder)
    bypass.attach(model, [2, 0], rank=8, mlp=mlp)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.skip_adapters.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path / f"bypassed-{variant}"
    phi3skip.save_pretrained(model, out, extra_json={"skip.json": PROFILE})
    return out, model


def inputs(cfg, n: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size - 6, (1, n), generator=torch.Generator().manual_seed(seed))


def ours(model, x: torch.Tensor, skip, long_rope: bool | None = None) -> np.ndarray:
    with torch.no_grad():
        return model(x, skip=skip, long_rope=long_rope)[0].float().numpy()


def length(cfg) -> int:
    """Tokens that stay inside the model's sliding window (llama.cpp runs phi3 without it)."""
    return min(T, cfg.sliding_window or T)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_f32_plain_sets_run_exactly_in_llama_cpp(tmp_path, tokenizers, variant):
    """The full model and a plain skip set (layers removed): the phi3 GGUF's logits are phi3skip's."""
    folder, model = student(tmp_path, variant, tokenizers["spm" if variant.startswith("mini") else "bpe"])
    cfg = model.config
    x = inputs(cfg, length(cfg))
    long = True if cfg.rope_scaling is not None else None  # llama.cpp's context (>= 256) is past the original
    for skip in ((), (2, 0)):
        res = export(folder, skip=",".join(map(str, skip)) or "none", gguf=tmp_path / f"{len(skip)}.gguf",
                     warn=lambda m: None)
        assert res.slots is None
        got = llamacpp.logits(res.gguf, x[0].tolist())
        assert np.abs(got - ours(model, x, skip, long)).max() <= 2e-4, skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_f32_bypassed_sets_run_exactly_in_llama_cpp(tmp_path, tokenizers, variant):
    """Bypassed skip sets become deci GGUFs: linear-attention + FFN blocks for the bypasses, GQA, tied embeddings,
    windows; their logits are phi3skip's. LongRoPE and partial rotary are refused before anything is written."""
    folder, model = with_bypasses(tmp_path, variant, tokenizers["spm" if variant.startswith("mini") else "bpe"])
    cfg = model.config
    if variant in NO_DECI:
        with pytest.raises(UserError, match=NO_DECI[variant]):
            export(folder, skip="2,0", gguf=tmp_path / "m.gguf", out=tmp_path / "out")
        assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "out").exists()
        return
    x = inputs(cfg, length(cfg))
    for skip in ((2, 0), (2,), (0, 3)):  # two bypasses; one; a bypass beside a removed layer
        res = export(folder, skip=",".join(map(str, skip)), gguf=tmp_path / f"{skip}.gguf", warn=lambda m: None)
        assert [s.layer for s in res.slots if s.bypass] == sorted(set(skip) & {0, 2})
        got = llamacpp.logits(res.gguf, x[0].tolist())
        assert np.abs(got - ours(model, x, skip)).max() <= 2e-4, skip


def test_deci_context_is_the_sliding_window(tmp_path, tokenizers):
    """deci has no sliding window: a windowed model's GGUF says its window as its context length."""
    gguf = pytest.importorskip("gguf")
    folder, model = with_bypasses(tmp_path, "medium-gqa", tokenizers["bpe"])
    res = export(folder, skip="2,0", gguf=tmp_path / "m.gguf", out=tmp_path / "out")
    r = gguf.GGUFReader(res.gguf)
    assert int(r.fields["deci.context_length"].contents()) == model.config.sliding_window == 9
    assert r.fields["deci.attention.head_count_kv"].contents() == [0, 2, 0, 2]
    assert "9 tokens" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("outtype,tolerance", [("f16", 0.002), ("bf16", 0.01), ("q8_0", 0.01)])
@pytest.mark.parametrize("kind", ["plain", "bypassed"])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_ggufs_keep_the_perplexity(tmp_path, tokenizers, outtype, tolerance, kind, tied):
    """f16, bf16 and q8_0, tied and untied embeddings: llama.cpp's perplexity on held-out windows within
    `tolerance` (relative) of phi3skip's fp32 model skipping the same layers."""
    if kind == "plain":
        folder, model = student(tmp_path, "gqa-tied", tokenizers["bpe"], tie_word_embeddings=tied)
        skip = (2,)
    else:
        folder, model = with_bypasses(tmp_path, "gqa-tied", tokenizers["bpe"], mlp=32, tied=tied)
        skip = (2, 0)
    assert model.config.tie_word_embeddings == tied
    res = export(folder, skip=",".join(map(str, skip)), gguf=tmp_path / "m.gguf", outtype=outtype, warn=lambda m: None)
    windows = torch.cat([inputs(model.config, 33, seed=s) for s in range(4)])
    theirs = llamacpp.perplexity(res.gguf, windows.tolist())
    mine = perplexity_ci(model, [(windows[:, :-1], windows[:, 1:])], skip).ppl
    assert abs(theirs / mine - 1) <= tolerance, (theirs, mine)


def test_untied_zero_ffn_and_refusals(tmp_path, tokenizers):
    """An untied model whose bypasses have no MLP channels (a zero FFN keeps llama.cpp's deci block whole), and
    a parallel-form student (saved by an earlier phi3skip), which no engine's block computes: one line."""
    folder, model = with_bypasses(tmp_path, "medium-gqa", tokenizers["bpe"], mlp=0)
    assert not model.config.tie_word_embeddings
    res = export(folder, skip="2,0", gguf=tmp_path / "m.gguf", warn=lambda m: None)
    x = inputs(model.config, 9)
    assert np.abs(llamacpp.logits(res.gguf, x[0].tolist()) - ours(model, x, (2, 0))).max() <= 2e-4
    model.skip_adapters.form = "parallel"
    phi3skip.save_pretrained(model, tmp_path / "old", extra_json={"skip.json": PROFILE})
    with pytest.raises(UserError, match="parallel form"):
        export(tmp_path / "old", skip="2", gguf=tmp_path / "old.gguf")


@pytest.mark.integration
def test_smollm2_student_in_llama_cpp(smollm2_dir, tmp_path):
    """The real model with least-squares bypasses on its demo layers: the deci GGUF's perplexity in llama.cpp is
    phi3skip's for that skip set within 0.5% (f32) and 1.5% (q8_0); the full model's phi3 GGUF likewise."""
    from phi3skip.data.tokens import eval_batches
    from phi3skip.data.tokenizer import load_tokenizer

    model = phi3skip.from_pretrained(smollm2_dir, dtype=torch.float32)
    layers = [14, 13, 25, 3]
    tok = load_tokenizer(str(smollm2_dir))
    text = Path(bypass.__file__).read_text() + Path(phi3skip.formats.export.__file__).read_text()
    ids = np.asarray(tok.encode(text).ids, dtype=np.int64)
    fit, held = ids[:2048], ids[2048:2048 + 1024]
    bypass.attach(model, layers)
    bypass_init.fit_lstsq(model, [torch.from_numpy(fit).view(8, 256)], layers)
    phi3skip.save_pretrained(model, tmp_path / "student", extra_json={"skip.json": {"layers": layers}})
    windows = list(eval_batches(held, 4, 256, max_tokens=1024))
    for skip in ((), tuple(layers)):
        mine = perplexity_ci(model, windows, skip).ppl
        for outtype, tolerance in (("f32", 0.005), ("q8_0", 0.015)):
            res = export(tmp_path / "student", skip=",".join(map(str, skip)) or "none",
                         gguf=tmp_path / f"{len(skip)}-{outtype}.gguf", outtype=outtype, warn=lambda m: None)
            theirs = llamacpp.perplexity(res.gguf, [w for x, y in windows for w in torch.cat([x, y[:, -1:]], 1).tolist()])
            assert abs(theirs / mine - 1) <= tolerance, (skip, outtype, theirs, mine)


def test_check_gguf_bad_input_is_one_line(tmp_path, tokenizers):
    """scripts/check_gguf.py: a mistake is one line and exit 2, before any model loads; a file llama.cpp cannot
    load says llama.cpp's own reason."""
    import subprocess
    import sys

    folder, _ = student(tmp_path, "gqa-tied", tokenizers["bpe"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    data = tmp_path / "t.txt"
    data.write_text("w " * 400)
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_gguf.py"
    for argv, msg in [(["--gguf", str(bad)], "give one of --data"),
                      (["--gguf", str(tmp_path / "no.gguf"), "--text", str(data)], "no such file"),
                      (["--gguf", str(bad), "--text", str(data), "--threads", "0"], "--threads"),
                      (["--gguf", str(bad), "--text", str(data), "--skip", "2"], "llama.cpp cannot load it (")]:
        r = subprocess.run([sys.executable, str(script), "--model", str(folder), "--seq-len", "32", *argv],
                           capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
