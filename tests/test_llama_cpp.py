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
                  tied: bool | None = None, rank: int = 8) -> tuple[Path, object]:
    """A student whose layers 2 and 0 run random (nonzero) sequential bypasses when skipped (rank 0: attention
    dropped, an FFN of `mlp` channels kept)."""
    folder, _ = student(tmp_path, variant, tok, seed=seed,
                        **({} if tied is None else {"tie_word_embeddings": tied}))
    model = phi3skip.from_pretrained(folder)
    bypass.attach(model, [2, 0], rank=rank, mlp=mlp)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.skip_adapters.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path / f"bypassed-{variant}-r{rank}"
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


def _greedy_agrees(model, skip, prompt: list[int], theirs: list[int]) -> None:
    """llama.cpp's greedy tokens are phi3skip's (its Generator, greedy) for the same skip set; a difference is allowed
    only where phi3skip's top two logits tie within float error, and the comparison ends there."""
    from phi3skip.serve.generate import Generator

    ours = Generator(model, skip).generate([prompt], max_new_tokens=len(theirs)).tokens[0]
    seq = list(prompt)
    for j, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            with torch.no_grad():
                top = model(torch.tensor([seq]), skip=skip)[0, -1].topk(2).values
            assert float(top[0] - top[1]) < 1e-4, (j, ours, theirs)
            return
        seq.append(a)
    assert len(ours) == len(theirs)


@pytest.mark.parametrize("kind", ["plain", "bypassed"])
def test_decoder_decodes_greedily(tmp_path, tokenizers, kind):
    """llamacpp.Decoder, which times llama.cpp's decoding, decodes for real: the argmax of the last position's logits
    each step (not llama-cpp-python's `scores`, which `eval` leaves unwritten without every position's logits), its
    tokens kept in `tokens` and equal to phi3skip's greedy tokens for an f32 export."""
    if kind == "plain":
        folder, model = student(tmp_path, "gqa-tied", tokenizers["bpe"])
        skip = (2,)
    else:
        folder, model = with_bypasses(tmp_path, "gqa-tied", tokenizers["bpe"])
        skip = (2, 0)
    res = export(folder, skip=",".join(map(str, skip)), gguf=tmp_path / "m.gguf", warn=lambda m: None)
    prompt = inputs(model.config, 6)[0].tolist()
    decoder = llamacpp.Decoder(res.gguf, prompt, new_tokens=10)
    try:
        first = list(decoder.tokens)
        assert len(first) == 11 and decoder.run() > 0 and decoder.tokens == first  # each run decodes the same
    finally:
        decoder.close()
    _greedy_agrees(model, skip, prompt, first)


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


@pytest.mark.parametrize("kind", ["plain", "bypassed"])
def test_phi3skip_quantized_beside_llama_cpp_q8_0_and_q4_1(tmp_path, tokenizers, kind):
    """q4_0 and q4_1 GGUFs (the gguf package's quantizers) load and run in llama.cpp; phi3skip's weight-only int8 and
    int4 (q4_1's blocks) score the same windows within a few percent of llama.cpp's q8_0 and q4_1: the same bits per
    weight."""
    if kind == "plain":
        folder, model = student(tmp_path, "gqa-tied", tokenizers["bpe"])
        skip = (2,)
    else:
        folder, model = with_bypasses(tmp_path, "gqa-tied", tokenizers["bpe"], mlp=32, rank=32)
        skip = (2, 0)
    windows = torch.cat([inputs(model.config, 33, seed=s) for s in range(4)])
    full = perplexity_ci(model, [(windows[:, :-1], windows[:, 1:])], skip).ppl
    export(folder, skip=",".join(map(str, skip)), gguf=tmp_path / "m.q4_0.gguf", outtype="q4_0", warn=lambda m: None)
    assert abs(llamacpp.perplexity(tmp_path / "m.q4_0.gguf", windows.tolist()) / full - 1) < 0.1
    for mode, outtype, tolerance in (("int8", "q8_0", 0.01), ("int4", "q4_1", 0.03)):
        res = export(folder, skip=",".join(map(str, skip)), gguf=tmp_path / f"m.{outtype}.gguf", outtype=outtype,
                     warn=lambda m: None)
        theirs = llamacpp.perplexity(res.gguf, windows.tolist())
        quantized = phi3skip.from_pretrained(folder, quantize=mode)
        mine = perplexity_ci(quantized, [(windows[:, :-1], windows[:, 1:])], skip).ppl
        assert abs(mine / theirs - 1) <= tolerance, (mode, mine, theirs, full)


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
                      (["--gguf", str(bad), "--text", str(data), "--skip", "2"], "not a GGUF model")]:
        r = subprocess.run([sys.executable, str(script), "--model", str(folder), "--seq-len", "32", *argv],
                           capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr


def test_check_gguf_refuses_a_gguf_that_is_not_the_skip_set(tmp_path, tokenizers):
    """check_gguf reads the GGUF's vocabulary, hidden size, blocks and architecture against the student and the
    skip set before llama.cpp runs it, one line each; and keeps --seq-len inside a sliding window."""
    import subprocess
    import sys

    folder, model = with_bypasses(tmp_path, "gqa-tied", tokenizers["bpe"])
    full = export(folder, skip="none", gguf=tmp_path / "full.gguf", warn=lambda m: None).gguf
    byp = export(folder, skip="2,0", gguf=tmp_path / "byp.gguf", warn=lambda m: None).gguf
    other, _ = student(tmp_path / "o", "gqa-tied", tokenizers["spm"])  # another vocabulary
    foreign = export(other, skip="none", gguf=tmp_path / "foreign.gguf", warn=lambda m: None).gguf
    wide, _ = student(tmp_path / "w", "gqa-tied", tokenizers["bpe"], hidden_size=96)
    wider = export(wide, skip="none", gguf=tmp_path / "wide.gguf", warn=lambda m: None).gguf
    windowed, _ = student(tmp_path / "m", "medium-gqa", tokenizers["bpe"])
    data = tmp_path / "t.txt"
    data.write_text("w " * 400)
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_gguf.py"
    cases = [([str(folder), "--gguf", str(full), "--skip", "3"], "4 blocks, where skip set 3 exports as 3"),
             ([str(folder), "--gguf", str(full), "--skip", "2,0"], "phi3 architecture, where skip set 2,0 exports as deci"),
             ([str(folder), "--gguf", str(foreign), "--skip", "none"], "a vocabulary of"),
             ([str(folder), "--gguf", str(wider), "--skip", "none"], "hidden size 96"),
             ([str(folder), "--gguf", str(byp), "--skip", "2,0", "--against", str(foreign)], "a vocabulary of"),
             ([str(windowed), "--gguf", str(full), "--seq-len", "10"], "--seq-len must be in 1..9 (the model's sliding")]
    for argv, msg in cases:
        r = subprocess.run([sys.executable, str(script), "--model", *argv, "--text", str(data), "--speed-tokens", "0",
                            *(["--seq-len", "16"] if "--seq-len" not in argv else [])],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, (msg, r.stderr)
    ok = subprocess.run([sys.executable, str(script), "--model", str(folder), "--gguf", str(byp), "--skip", "2,0",
                         "--text", str(data), "--seq-len", "16", "--against", str(full), "--speed-tokens", "4",
                         "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "llama.cpp byp.gguf (skip 2,0): perplexity" in ok.stdout and "llama.cpp decode:" in ok.stdout
