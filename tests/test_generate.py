"""Generation: cached decoding equals recomputation, skip sets, LongRoPE re-prefill and sliding window as in
transformers, lossless self-speculative decoding, batches, sampling, the chat format and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi3skip import Phi3Config, Phi3ForCausalLM, UserError
from phi3skip.data.chat import StreamDecoder, format_chat, render_builtin, stop_token_ids
from phi3skip.commands import generate as cli
from phi3skip.serve.generate import Generator, set_weight_layout
from phi3skip.formats.checkpoints import from_pretrained, save_pretrained
from phi3skip.serve.sampling import Sampling, logits_to_probs, sample
from phi3skip.model.skipsets import default_draft_skip
from phi3skip.serve.speculative import accept_drafts

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
V = 97


def _longrope(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"type": "longrope", "short_factor": (1 + torch.rand(n, generator=g)).tolist(),
            "long_factor": (1 + 8 * torch.rand(n, generator=g)).tolist()}


BASE = dict(model_type="phi3", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="float32")
VARIANTS = {
    "window": dict(max_position_embeddings=64, original_max_position_embeddings=64, sliding_window=7),
    "gqa": dict(num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64),
    "longrope": dict(max_position_embeddings=128, original_max_position_embeddings=16, rope_scaling=_longrope(8, 1)),
    "phi4": dict(num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
                 max_position_embeddings=128, original_max_position_embeddings=16, rope_scaling=_longrope(6, 2)),
}
_PAIRS: dict = {}


def pair(variant: str):
    """(transformers model, ours, config) with the same random weights; built once per variant."""
    if variant not in _PAIRS:
        cfg = Phi3Config.from_dict({**BASE, **VARIANTS[variant]})
        torch.manual_seed(0)
        hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg.to_dict())).eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
        hf.generation_config.eos_token_id = None  # fixed-length runs
        ours = Phi3ForCausalLM(cfg).eval()
        ours.load_state_dict(hf.state_dict(), strict=not cfg.tie_word_embeddings)
        _PAIRS[variant] = hf, ours, cfg
    return _PAIRS[variant]


def model(variant: str) -> Phi3ForCausalLM:
    return pair(variant)[1]


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def greedy_recompute(m: Phi3ForCausalLM, ids: list[int], n: int, skip=()) -> list[int]:
    """Greedy by a full forward over the whole sequence at every step: no cache at all."""
    seq, dev = list(ids), m.lm_head.weight.device
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq], device=dev), skip=skip)[0, -1].argmax()))
    return seq[len(ids):]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(n)


# Plain decoding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,skip", [("window", ()), ("gqa", ()), ("longrope", ()), ("phi4", ()),
                                          ("window", (1,)), ("gqa", (3, 1)), ("longrope", (2,))])
def test_cached_greedy_equals_recomputation(variant, skip):
    m = model(variant)
    ids = prompt(10, seed=5)
    out = Generator(m, skip).generate([ids], 20)
    assert out.tokens[0] == greedy_recompute(m, ids, 20, skip)
    assert out.finish == ["length"] and out.new_tokens == 20
    assert out.layers_run == 4 - len(skip)
    if variant in ("longrope", "phi4"):  # 10 + 20 tokens cross original_max_position_embeddings = 16
        assert out.reprefills == 1


@pytest.mark.parametrize("variant,P,N", [("window", 6, 24), ("longrope", 10, 20), ("longrope", 20, 6),
                                         ("phi4", 16, 6)])
def test_greedy_equals_transformers_generate(variant, P, N):
    """Sliding window, and the LongRoPE cache drop when the sequence first crosses original_max (these prompts
    were checked to give different tokens without the re-prefill or with short factors only)."""
    hf, m, _ = pair(variant)
    ids = prompt(P, seed=5)
    x = torch.tensor([ids])
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                      pad_token_id=0)[0, P:].tolist()
    assert Generator(m).generate([ids], N).tokens[0] == ref


def test_cpu_weight_layout_changes_no_value_token_or_saved_byte(tmp_path):
    """The Generator stores Linear weights column-major on the CPU (MKL's faster layout): same values, tied weights
    still tied, the tokens of row-major weights, and a checkpoint saved afterwards holds the same tensors."""
    cfg = Phi3Config.from_dict({**BASE, **VARIANTS["phi4"]})  # tied embeddings
    m = Phi3ForCausalLM(cfg).eval()
    m.load_state_dict(model("phi4").state_dict())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = prompt(9, seed=4)
    ref = Generator(m, (1,), column_major=False).generate([ids], 12).tokens
    assert all(p.is_contiguous() for p in m.parameters())
    assert Generator(m, (1,)).generate([ids], 12).tokens == ref
    linears = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and all(w.stride() == (1, w.shape[0]) for w in linears)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    saved = from_pretrained(save_pretrained(m, tmp_path / "saved")).state_dict()
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in saved)
    set_weight_layout(m, column_major=False)
    assert all(p.is_contiguous() for p in m.parameters())


def test_batch_of_different_lengths_equals_one_by_one():
    for variant, skip in (("window", ()), ("gqa", (2,))):
        m = model(variant)
        prompts = [prompt(3, 1), prompt(11, 2), prompt(7, 3)]
        gen = Generator(m, skip)
        batch = gen.generate(prompts, 12)
        alone = [gen.generate([p], 12).tokens[0] for p in prompts]
        assert batch.tokens == alone
        assert batch.prompt_tokens == 21 and batch.new_tokens == 36


def test_stop_tokens_end_each_row():
    m = model("gqa")
    prompts = [prompt(5, 1), prompt(8, 2)]
    full = Generator(m).generate(prompts, 10).tokens
    stop = full[0][3]
    out = Generator(m).generate(prompts, 10, stop_ids=[stop])
    for row, toks in zip(full, out.tokens):
        cut = row.index(stop) if stop in row else len(row)
        assert toks == row[:cut]
    assert out.finish[0] == "stop"


# Self-speculative decoding -------------------------------------------------------------------------------
def damped(variant: str, layers, scale: float = 0.1) -> Phi3ForCausalLM:
    """A copy whose given layers barely change the residual stream: a draft skipping them agrees often, but not
    always, with the full model (random models otherwise reject nearly everything)."""
    hf, m, cfg = pair(variant)
    out = Phi3ForCausalLM(cfg).eval()
    out.load_state_dict(m.state_dict())
    with torch.no_grad():
        for i in layers:
            out.model.layers[i].self_attn.o_proj.weight.mul_(scale)
            out.model.layers[i].mlp.down_proj.weight.mul_(scale)
    return out


@pytest.mark.parametrize("variant,skip,draft,K", [
    ("gqa", (), (2,), 1), ("gqa", (), (2,), 3), ("gqa", (), (2, 3), 4), ("gqa", (3,), (3, 1), 2),
    ("gqa", (), (0,), 3),  # nothing shared: the first layer differs
    ("window", (), (1, 2), 5), ("longrope", (), (2,), 3), ("longrope", (1,), (1, 2), 2)])
def test_speculative_greedy_equals_plain_greedy(variant, skip, draft, K):
    m = damped(variant, draft)
    ids = prompt(10, seed=7)
    plain = Generator(m, skip).generate([ids], 24)
    spec = Generator(m, skip, draft_skip=draft, lookahead=K).generate([ids], 24)
    assert spec.tokens == plain.tokens
    assert 0 < spec.drafted and 0 <= spec.accepted <= spec.drafted
    if variant == "longrope":
        assert spec.reprefills == 1


def test_speculative_shares_lower_layers_and_reports_acceptance():
    m = damped("gqa", (2, 3), scale=0.02)
    gen = Generator(m, (), draft_skip=(3, 2), lookahead=4)
    assert gen.shared_layers == [0, 1]
    out = gen.generate([prompt(6, 1), prompt(9, 2)], 16)
    assert out.tokens == Generator(m).generate([prompt(6, 1), prompt(9, 2)], 16).tokens
    assert out.acceptance_rate > 0.5
    assert "acceptance" in out.summary()
    ws = gen._ws
    assert ws.draft_cache[0] is ws.cache[0] and 2 not in ws.draft_cache


def test_acceptance_rule_keeps_the_verifier_distribution():
    """Draft x ~ q, keep it with prob min(1, p/q), else draw from max(p - q, 0): the first emitted token ~ p."""
    torch.manual_seed(0)
    M, K, Vs = 200_000, 2, 5
    p = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2])
    target = p.expand(M, K + 1, Vs).contiguous()
    qs = q.expand(M, K, Vs).contiguous()
    drafts = torch.multinomial(q, M * K, replacement=True).view(M, K)
    n, nxt = accept_drafts(drafts, qs, target, greedy=False)
    first = torch.where(n > 0, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=Vs).float() / M
    assert (freq - p).abs().max() < 0.005
    assert abs(n.float().mean().item() - (torch.minimum(p, q).sum() * (1 + torch.minimum(p, q).sum())).item()) < 0.01


def test_speculative_sampling_runs_and_is_seeded():
    m = damped("gqa", (3,), scale=0.05)
    s = Sampling(temperature=0.8, top_k=20, top_p=0.95)
    gen = Generator(m, draft_skip=(3,), lookahead=3)
    a = gen.generate([prompt(5)], 20, s, seed=1)
    b = gen.generate([prompt(5)], 20, s, seed=1)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 20 and all(0 <= t < V for t in a.tokens[0])
    assert a.drafted > 0


# Sampling -----------------------------------------------------------------------------------------------
def test_sampling_warpers_match_transformers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    s = Sampling(temperature=0.7, top_k=10, top_p=0.8)
    ref = logits.clone()
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        ref = w(None, ref)
    assert torch.allclose(logits_to_probs(logits, s), ref.softmax(-1), atol=1e-6)


def test_sampling_draws_from_the_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(100_000, 4)
    toks, probs = sample(logits, Sampling(temperature=1.0))
    freq = torch.bincount(toks, minlength=4).float() / len(toks)
    assert (freq - logits[0].softmax(-1)).abs().max() < 0.01
    assert sample(logits[:1], Sampling())[1] is None  # greedy


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling(bad):
    with pytest.raises(UserError):
        Sampling(**bad)


def test_bad_generate_inputs():
    m = model("gqa")
    with pytest.raises(UserError, match="out of range"):
        Generator(m, (4,))
    with pytest.raises(UserError, match="empty"):
        Generator(m).generate([[]], 4)
    with pytest.raises(UserError, match="context of 64"):
        Generator(m).generate([prompt(10)], 60)
    with pytest.raises(UserError, match="must include"):
        Generator(m, (1,), draft_skip=(2,))
    with pytest.raises(UserError, match="more layers"):
        Generator(m, (1,), draft_skip=(1,))


# Compiled decoding ----------------------------------------------------------------------------------------
def test_compiled_decoding_equals_eager():
    """torch.compile of the layers (one compilation for all of them), plain and speculative; and of the whole
    decode step."""
    m = damped("gqa", (3,), scale=0.05)
    ids = prompt(6, 3)
    ref = Generator(m, (1,)).generate([ids], 8).tokens
    gen = Generator(m, (1,), compile=True)
    assert gen.generate([ids], 8).tokens == ref
    spec = Generator(m, (1,), draft_skip=(3, 1), lookahead=1, compile=True)  # steps of 1 and 2 tokens only
    out = spec.generate([ids], 8)
    assert out.tokens == ref and out.compile_s > 0
    small = Phi3ForCausalLM(Phi3Config.from_dict({**BASE, **VARIANTS["gqa"], "num_hidden_layers": 2})).eval()
    ref = Generator(small).generate([ids], 6).tokens  # whole-step compilation: a 2-layer model keeps it short
    assert Generator(small, compile="step").generate([ids], 6).tokens == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["window", "longrope"])
def test_cuda_graphs_and_step_compile_equal_recomputation(variant):
    """On CUDA: compiled layers + CUDA graphs (plain, padded batch, speculative, sampling) and the whole-step
    compile (mode reduce-overhead) give the tokens of greedy recomputation."""
    m = damped(variant, (2, 3)).cuda()
    ids = prompt(10, seed=3)
    ref = greedy_recompute(m, ids, 20)
    gen = Generator(m, compile="blocks")
    assert gen.cuda_graphs and gen.generate([ids], 20).tokens[0] == ref
    assert gen.generate([ids], 20).tokens[0] == ref  # replayed graphs
    batch = [ids[:3], ids, ids[:7]]
    assert Generator(m, compile="blocks").generate(batch, 12).tokens == Generator(m).generate(batch, 12).tokens
    spec = Generator(m, draft_skip=(3, 2), lookahead=3, compile="blocks").generate([ids], 20)
    assert spec.tokens[0] == ref and spec.drafted > 0
    s = Sampling(0.8, 20, 0.9)
    a = Generator(m, compile="blocks").generate([ids], 20, s, seed=1).tokens
    assert a == Generator(m, compile="blocks").generate([ids], 20, s, seed=1).tokens
    assert Generator(m, compile="step").generate([ids], 20).tokens[0] == ref


# Chat format and stop tokens ------------------------------------------------------------------------------
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>", "<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"] + \
        [f"w{i}" for i in range(V - 6)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"])
    return tok


def test_chat_format_and_stop_ids(tmp_path):
    tok = tiny_tokenizer()
    assert render_builtin("phi3", [{"role": "user", "content": "hi"}]) == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert format_chat("hi", tok, tmp_path) == "<|user|>\nhi<|end|>\n<|assistant|>\n"  # no template: built-in
    tpl = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": tpl, "eos_token": "<|end|>"}))
    pytest.importorskip("jinja2")
    assert format_chat("hi", tok, tmp_path, system="be brief") == \
        "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    cfg = Phi3Config.from_dict({**BASE, **VARIANTS["gqa"], "eos_token_id": 2})
    assert stop_token_ids(tmp_path, cfg, tok) == [2, 4, 5]


@pytest.mark.integration
def test_chat_template_renders_real_smollm2_template(smollm2_dir):
    from phi3skip.data.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    text = format_chat("Hello", tok, smollm2_dir)
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    cfg = Phi3Config.from_json(smollm2_dir / "config.json")
    assert tok.token_to_id("<|im_end|>") in stop_token_ids(smollm2_dir, cfg, tok)


def test_stream_decoder_holds_back_split_characters():
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["héllo wörld 🙂 " * 20], vocab_size=260, show_progress=False)
    text = "wörld 🙂 héllo"
    ids = tok.encode(text).ids
    d = StreamDecoder(tok)
    pieces = [d.push([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# The real model ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_greedy_equals_transformers(smollm2_dir):
    from phi3skip import from_pretrained
    from phi3skip.data.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    ids = tok.encode(format_chat("What is the capital of France?", tok, smollm2_dir),
                     add_special_tokens=False).ids
    hf = transformers.Phi3ForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    x = torch.tensor([ids])
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                      pad_token_id=0)[0, len(ids):]
    del hf
    ours = from_pretrained(smollm2_dir, dtype=torch.float32)
    out = Generator(ours).generate([ids], 32)
    assert out.tokens[0] == ref.tolist()
    spec = Generator(ours, draft_skip=(28, 26), lookahead=3).generate([ids], 32)
    assert spec.tokens == out.tokens and spec.acceptance_rate > 0


# The command line ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    m = model("gqa")
    tok = tiny_tokenizer()
    save_pretrained(m, folder, extra_json={"skip.json": {"layers": [2, 1], "ppl": {"0": 10.0, "1": 11.0}}})
    tok.save(str(folder / "tokenizer.json"))
    return folder


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@pytest.mark.integration
def test_cli_generates_streams_and_summarises(tiny_dir):
    r = run_cli("--model", str(tiny_dir), "--skip", "2", "--prompt", "w1 w2 w3", "--max-new-tokens", "6",
                "--ignore-eos", "--chat")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 6
    last = r.stderr.strip().splitlines()[-1]
    assert "new tokens 6" in last and "layers run 3/4 (skip 2)" in last and "tokens/s" in last


@pytest.mark.parametrize("args,stdin,message", [
    (["--skip", "4", "--prompt", "w1"], None, "skip index 4 is out of range"),
    (["--skip", "3,x", "--prompt", "w1"], None, "--skip"),
    (["--prompt", "  "], None, "empty"),
    ([], "", "empty"),
    (["--prompt", "w1 w2", "--max-new-tokens", "63"], None, "--max-new-tokens must be in 1..62 (the model's positions"),
    (["--prompt", "w1", "--speculative", "--draft-skip", "9"], None, "out of range"),
    (["--prompt", "w1", "--temperature", "-1"], None, "temperature"),
    (["--prompt", "w1", "--bogus"], None, "unrecognized arguments"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_dir, capsys, monkeypatch, args, stdin, message):
    import io

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(tiny_dir), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.integration
def test_cli_unknown_model_is_one_line_exit_2(tmp_path):
    for name in (str(tmp_path / "nope"), "no-such-org/no-such-model"):
        r = run_cli("--model", name, "--prompt", "hi")
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_show_skips_and_default_draft(tiny_dir, capsys):
    cli.run(["--model", str(tiny_dir), "--show-skips"])
    out = capsys.readouterr().out.splitlines()
    assert "skip order 2, 1" in out[0] and len(out) == 1 + 2 + 3 + 1  # title, table head, k = 0..2, a hint
    assert out[4].startswith("| 1 | 2 | – |") and f"--model {tiny_dir} --num-skip 1 --out DIR" in out[4]
    trained = cli.trained_order(tiny_dir)
    assert trained == [2, 1] and cli.trained_order(tiny_dir.parent) == []
    assert default_draft_skip(trained, (), 4) == (2, 1)
    assert default_draft_skip(trained, (2, 1), 4) == (2, 1)  # nothing to add from skip.json: heuristic
    assert default_draft_skip([], (), 30) == (28, 26, 24, 22, 20, 18, 16)


def test_cli_first_k_and_untrained_layer_note(tiny_dir, capsys):
    cli.run(["--model", str(tiny_dir), "--skip", "first:1", "--prompt", "w1 w2", "--max-new-tokens", "2",
              "--ignore-eos"])
    err = capsys.readouterr().err
    assert "layers run 3/4" in err, err
    assert "not trained to skip" not in err
    cli.run(["--model", str(tiny_dir), "--skip", "3", "--prompt", "w1", "--max-new-tokens", "2", "--ignore-eos"])
    err = capsys.readouterr().err
    assert "note: --skip names layer(s) 3 that the student was not trained to skip (its order: 2,1)" in err
    for bad, msg in (("first:3", "K must be in 0..2"), ("first:x", "K must be"), ("2;1", "expected layer indices")):
        with pytest.raises(UserError, match=msg):
            cli.run(["--model", str(tiny_dir), "--skip", bad, "--prompt", "w1"])


def test_cli_batch_and_speculative(tiny_dir, capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"w1 w2"\n{"prompt": "w5 w6 w7 w8"}\n')
    cli.run(["--model", str(tiny_dir), "--prompt-file", str(f), "--max-new-tokens", "5", "--ignore-eos"])
    cap = capsys.readouterr()
    assert cap.out.count("==> prompt") == 2 and "new tokens 10" in cap.err
    cli.run(["--model", str(tiny_dir), "--prompt", "w1 w2", "--max-new-tokens", "5", "--ignore-eos",
              "--speculative", "--draft-skip", "3,2", "--lookahead", "2"])
    cap = capsys.readouterr()
    assert "acceptance" in cap.err and "draft runs 2/4" in cap.err


def test_speculative_defaults_to_the_measured_draft_in_skip_json(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "student"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    profile = json.loads((folder / "skip.json").read_text())
    profile["speculative"] = {"draft_skip": [3, 2], "lookahead": 2, "speedup": {"code": 0.9, "prose": 0.8}}
    (folder / "skip.json").write_text(json.dumps(profile))
    cli.run(["--model", str(folder), "--prompt", "w1 w2", "--max-new-tokens", "5", "--ignore-eos", "--speculative"])
    err = capsys.readouterr().err
    assert "draft runs 2/4 layers, lookahead 2" in err, err
    assert "note: skip.json's best measured draft ran at 0.90x (code), 0.80x (prose)" in err
    cli.run(["--model", str(folder), "--prompt", "w1 w2", "--max-new-tokens", "5", "--ignore-eos", "--speculative",
             "--skip", "2"])  # a verifier skipping 2 is served by the measured draft 3,2
    assert "draft runs 2/4 layers, lookahead 2" in capsys.readouterr().err
    cli.run(["--model", str(folder), "--prompt", "w1 w2", "--max-new-tokens", "5", "--ignore-eos", "--speculative",
             "--skip", "1"])  # the verifier skips 1: the measured draft cannot serve it; skip + trained order
    err = capsys.readouterr().err
    assert "draft runs 2/4 layers, lookahead 4" in err and "note: skip.json" not in err, err


def test_non_finite_weights_are_one_line_not_empty_text(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    sd = load_file(broken / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(broken), "--prompt", "w1 w2", "--max-new-tokens", "4"])
    assert e.value.code == 2
    out = capsys.readouterr()
    assert len(out.err.strip().splitlines()) == 1 and "non-finite logits" in out.err, out.err
    assert out.out.strip() == ""
