"""Export of a skip set as a standard Phi-3 checkpoint: every model variant against transformers, the untying
rule, the adapter seam, the choice of skip set and its warnings, the model card, and the command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phi3skip
from phi3skip import Phi3ForCausalLM, UserError, save_checkpoint
from phi3skip.formats.export import serving_table, ExportError, choose_skip, export, measurements, prune

transformers = pytest.importorskip("transformers")
from test_model import make_pair, tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "export.py"
PROFILE = {"layers": [2, 0], "schedule": "nested", "teacher": "tiny-teacher", "val_tokens": 512,
           "weights_dtype": "float32",
           "perplexity": {"teacher": 10.0, "student": 10.5, "prefixes": [{"skip": [2], "perplexity": 11.25},
                                                                         {"skip": [2, 0], "perplexity": 13.5}]}}


def student(tmp_path: Path, variant: str, profile: dict | None = PROFILE) -> tuple[Path, torch.nn.Module]:
    _, ours, _ = make_pair(variant)
    extra = {"skip.json": profile} if profile is not None else None
    return phi3skip.save_pretrained(ours, tmp_path / f"student-{variant}", extra_json=extra), ours


@pytest.mark.parametrize("variant", ["mini-4k", "mini-128k-su", "medium-gqa", "phi3.5-longrope", "phi4-mini"])
@torch.no_grad()
def test_export_equals_skipping_in_transformers(tmp_path, variant):
    """Window, LongRoPE (su and longrope), GQA, partial rotary, tied embeddings: transformers' AutoModelForCausalLM
    on the export gives phi3skip's logits on the student with that skip set."""
    folder, ours = student(tmp_path, variant)
    res = export(folder, num_skip=2, out=tmp_path / "out")
    assert res.skip == (2, 0) and res.note is None  # a trained prefix: no warning
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["architectures"] == ["Phi3ForCausalLM"]
    assert cfg["tie_word_embeddings"] == ours.config.tie_word_embeddings
    assert not (tmp_path / "out" / "skip.json").exists()  # layer indices of the student mean nothing here
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Phi3ForCausalLM"
    x = tokens(24)  # longer than the windows (7, 9) and the LongRoPE original context (16)
    ref = ours(x, skip=(2, 0))
    assert (hf(x).logits - ref).abs().max().item() <= 1e-4
    again = phi3skip.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(again(x), ref, rtol=0, atol=1e-6)
    # blocks renumbered: the export's block 0 is the student's 1, block 1 the student's 3
    assert torch.equal(again.model.layers[0].mlp.down_proj.weight, ours.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(again.model.layers[1].self_attn.qkv_proj.weight, ours.model.layers[3].self_attn.qkv_proj.weight)


@torch.no_grad()
def test_llama_layout_student_and_dtype(tmp_path):
    """A Llama-layout checkpoint (fused on load) exports as Phi-3; --dtype casts; bf16 loads back in bf16."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "llama")
    ours = phi3skip.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    export(tmp_path / "llama", skip="1", out=tmp_path / "f32", warn=lambda m: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float32).eval()
    x = tokens(12)
    assert (hf(x).logits - ours(x, skip=[1])).abs().max().item() <= 1e-4
    res = export(tmp_path / "llama", skip="1", out=tmp_path / "bf16", dtype="bfloat16", warn=lambda m: None)
    assert res.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert phi3skip.from_pretrained(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16


@torch.no_grad()
def test_untied_when_head_differs(tmp_path):
    """Folding may change lm_head alone: a tied config is then written untied, with both tensors."""
    _, ours, cfg = make_pair("phi4-mini")
    sd = dict(ours.state_dict())
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 0.01
    pruned, new_cfg = prune(sd, cfg, (2,))
    assert not new_cfg.tie_word_embeddings and new_cfg.num_hidden_layers == 3
    assert set(pruned) >= {"lm_head.weight", "model.embed_tokens.weight"}
    save_checkpoint(pruned, new_cfg, tmp_path / "untied")
    untied = Phi3ForCausalLM(cfg.replace(tie_word_embeddings=False)).eval()
    untied.load_state_dict(sd)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "untied", dtype=torch.float32).eval()
    x = tokens(20)
    assert (hf(x).logits - untied(x, skip=(2,))).abs().max().item() <= 1e-4
    same, tied_cfg = prune(ours.state_dict(), cfg, (2,))  # unchanged head: stays tied, one tensor
    assert tied_cfg.tie_word_embeddings and "lm_head.weight" not in same


def nas_logits(folder: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """A Nemotron-NAS folder's logits [1, T, V] as a reader we did not write computes them: mlx-lm (tests/readers.py;
    skipped without it)."""
    from readers import mlx_logits

    return torch.from_numpy(mlx_logits(folder, x[0].tolist(), tmp_path))[None]


@torch.no_grad()
def test_bypassed_sets_export_as_heterogeneous_blocks(tmp_path):
    """A student with trained bypasses: a set that uses one becomes a Nemotron-NAS folder (a bypass is a linear
    attention + its FFN; a layer skipped without one is removed) whose logits, computed by mlx-lm, are the student's;
    a set that uses none exports the plain base, a Phi3ForCausalLM equal to phi3skip skipping those layers."""
    from phi3skip.model import bypass

    folder, _ = student(tmp_path, "medium-gqa")
    model = phi3skip.from_pretrained(folder)
    bypass.attach(model, [2], rank=8)
    for name, p in model.skip_adapters.named_parameters():
        p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.3)
    withad = tmp_path / "with-adapters"
    phi3skip.save_pretrained(model, withad, extra_json={"skip.json": {**PROFILE, "layers": [2]}})
    x = tokens(9)[:1]  # inside the sliding window (9), which the deci layout lacks
    for skip in ((2,), (2, 0)):
        out = export(withad, skip=",".join(map(str, skip)), out=tmp_path / f"deci{len(skip)}", warn=lambda m: None)
        cfg = json.loads((out.folder / "config.json").read_text())
        assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
        assert cfg["max_position_embeddings"] == 9 and cfg["num_hidden_layers"] == 4 - len(skip) + 1
        assert [b["attention"]["replace_with_linear"] for b in cfg["block_configs"]] == \
            [False] * (2 - len(skip) + 1) + [True, False]
        torch.testing.assert_close(nas_logits(out.folder, x, tmp_path), model(x, skip=skip), rtol=1e-4, atol=1e-4)
        card = (out.folder / "README.md").read_text()
        assert "llama.cpp" in card and "not vLLM" in card and "linear map" in card
    with pytest.warns(UserWarning, match="not a prefix of the trained order"):
        out = export(withad, skip="0", out=tmp_path / "out0")
    assert out.slots is None
    torch.testing.assert_close(phi3skip.from_pretrained(out.folder)(x), model(x, skip=(0,)), rtol=1e-5, atol=1e-5)


def test_choosing_the_skip_set():
    assert choose_skip(PROFILE, 4, num_skip=1) == (2,)
    assert choose_skip(PROFILE, 4, skip="0,2") == (0, 2)
    assert choose_skip(PROFILE, 4, skip="none") == ()
    for kw, message in [({}, "pass --skip LAYERS or --num-skip K"), ({"num_skip": 3}, r"--num-skip 3: must be in 1\.\.2"),
                        ({"skip": "4"}, "out of range"), ({"skip": "2,2"}, "twice"), ({"skip": "a,b"}, "--skip 'a,b'"),
                        ({"skip": "2;0"}, "one skip set"), ({"skip": "2", "num_skip": 1}, "not both")]:
        with pytest.raises(UserError, match=message):
            choose_skip(PROFILE, 4, **kw)
    with pytest.raises(UserError, match="no trained skip order"):
        choose_skip({}, 4, num_skip=1)


def test_untrained_set_warns_with_its_measured_quality(tmp_path):
    """A set outside the trained prefixes is exported with a warning naming its measured (or unmeasured) quality."""
    profile = {**PROFILE, "evaluation": {"results": [
        {"skip": [], "student": {"val": {"ppl": 10.4, "low": 9.0, "high": 12.0, "tokens": 800}},
         "teacher": {"val": {"ppl": 10.0, "low": 9.0, "high": 11.0, "tokens": 800}}},
        {"skip": [0, 1], "student": {"val": {"ppl": 31.5, "low": 28.0, "high": 35.0, "tokens": 800}},
         "teacher": {"val": {"ppl": 99.0, "low": 90.0, "high": 110.0, "tokens": 800}}}]}}
    folder, _ = student(tmp_path, "medium-gqa", profile)
    notes = []
    export(folder, skip="1,0", out=tmp_path / "a", warn=notes.append)
    assert len(notes) == 1 and "not a prefix of the trained order 2,0" in notes[0]
    assert "val perplexity 31.50 [28.00, 35.00] (scripts/evaluate.py)" in notes[0]
    export(folder, skip="3", out=tmp_path / "b", warn=notes.append)
    assert "never measured" in notes[1] and "--skip-sets '3'" in notes[1]
    card = (tmp_path / "a" / "README.md").read_text()
    assert "**not** a skip set the student was trained for" in card and "| 31.50 [28.00, 35.00] | 10.40 | 10.00 |" in card


def test_model_card(tmp_path):
    folder, _ = student(tmp_path, "mini-4k")
    export(folder, num_skip=2, out=tmp_path / "out", command="python scripts/export.py --num-skip 2")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "layers 2,0 removed" in card and "2 of 4 layers remain" in card
    assert "a prefix of the trained skip order 2,0" in card
    assert "| train.py | validation | 512 | 13.50 | 10.50 | 10.00 |" in card  # this set, the full student, the teacher
    assert "measured the student's weights as saved (float32)" in card
    assert "`python scripts/export.py --num-skip 2`" in card and "AutoModelForCausalLM" in card
    assert measurements(PROFILE, (0, 2))[0]["ppl"] == 13.5  # a set is a set: order does not matter


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


@pytest.mark.integration
def test_cli(tmp_path):
    folder, ours = student(tmp_path, "medium-gqa")
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "keep.txt").write_text("x")
    r = run_cli("--model", folder, "--num-skip", "1", "--out", exists)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --out {exists}: already exists; pass --overwrite to "
                                                  f"replace it, or choose another --out"]
    r = run_cli("--model", folder, "--skip", "3,1", "--out", exists, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "warning: --skip 3,1 is not a prefix of the trained order 2,0" in r.stderr
    assert "2 of 4 layers (removed 3,1)" in r.stdout and not (exists / "keep.txt").exists()
    x = tokens(16)
    with torch.no_grad():
        assert torch.equal(phi3skip.from_pretrained(exists)(x), ours(x, skip=(3, 1)))
    assert "--skip 3,1 --out" in (exists / "README.md").read_text()


@pytest.mark.parametrize("args,message", [
    (("--num-skip", "1"), "nothing to write: give --out DIR and/or --gguf FILE"),
    (("--skip", "0,1,2,3", "--out", "o"), "removes all 4 layers"),
    (("--skip", "7", "--out", "o"), "out of range"),
    (("--outtype", "q8_0", "--out", "o"), "--outtype needs --gguf FILE"),
    (("--outtype", "q4",), "invalid choice"),
])
def test_cli_bad_input(tmp_path, monkeypatch, args, message):
    from phi3skip.commands import export as cli

    folder, _ = student(tmp_path, "medium-gqa")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        cli.run(["--model", str(folder), *args])
    assert not (tmp_path / "o").exists()


def test_float16_overflow_is_refused(tmp_path):
    folder, ours = student(tmp_path, "medium-gqa")
    with torch.no_grad():
        ours.model.layers[1].mlp.down_proj.weight[0, 0] = 1e5
    folder = phi3skip.save_pretrained(ours, tmp_path / "big", extra_json={"skip.json": PROFILE})
    with pytest.raises(ExportError, match="not finite in float16 .*use --dtype bfloat16"):
        export(folder, num_skip=1, out=tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()


def test_serving_table_gives_each_trained_set_its_figures_engines_and_export_command():
    profile = {"layers": [2, 0], "perplexity": {"teacher": 9.0, "student": 9.0,
                                                "prefixes": [{"skip": [2], "perplexity": 9.5}]},
               "evaluation": {"results": [
                   {"skip": [], "student": {"code": {"ppl": 10.0}, "prose": {"ppl": 20.0}}, "tokens_per_s": 40.0},
                   {"skip": [2], "student": {"code": {"ppl": 10.5}, "prose": {"ppl": 21.0}}, "tokens_per_s": 44.0},
                   {"skip": [0, 2], "student": {"code": {"ppl": 11.25}}, "tokens_per_s": 50.0}]}}
    rows = serving_table(profile, 4, "M").splitlines()
    assert rows[0] == ("| k | skip | validation ppl (train.py) | code ppl (evaluate.py) | prose ppl (evaluate.py) | "
                       "speedup (phi3skip) | served by | export |")
    plain = "transformers, vLLM, SGLang, TGI, llama.cpp, mlx-lm"
    assert rows[2].startswith(f"| 0 | none | 9.00 | 10.00 | 20.00 | 1.00x | {plain} | `python scripts/export.py "
                              "--model M --skip none")
    assert rows[3].startswith(f"| 1 | 2 | 9.50 | 10.50 | 21.00 | 1.10x | {plain} | `python scripts/export.py "
                              "--model M --num-skip 1")
    assert rows[4].startswith(f"| 2 | 2,0 | – | 11.25 | – | 1.25x | {plain} |") and len(rows) == 5
    # bypasses on layer 2: a linear map only llama.cpp and mlx-lm run; attention dropped, every engine
    mapped = serving_table({**profile, "adapters": {"rank": 8, "mlp": 16, "layers": [2]}}, 4, "M").splitlines()
    assert "| 1.10x | llama.cpp, mlx-lm |" in mapped[3] and f"| 1.00x | {plain} |" in mapped[2]
    dropped = serving_table({**profile, "adapters": {"rank": 0, "mlp": 96, "layers": [2]}}, 4, "M").splitlines()
    assert "| 1.10x | vLLM, SGLang, TensorRT-LLM, llama.cpp, mlx-lm |" in dropped[3]


@pytest.mark.parametrize("dtype,student,outtype,says,never", [
    (torch.float32, torch.float32, None, "computes exactly what the student computes", "round"),
    (torch.bfloat16, torch.float32, None, "float32 weights cast to bfloat16", "exactly"),
    (torch.float32, torch.float32, "f32", "the GGUF holds these weights exactly", "round"),
    (torch.float32, torch.float32, "q8_0", "the GGUF's q8_0 weights round them further", "holds these weights"),
    (torch.bfloat16, torch.bfloat16, "f16", "the GGUF's f16 weights round them further", "holds these weights"),
])
def test_the_model_card_promises_exactness_only_without_rounding(dtype, student, outtype, says, never):
    from phi3skip.formats.export import fidelity

    text = fidelity(dtype, student, Path("m.gguf") if outtype else None, outtype)
    assert says in text and never not in text.replace(says, "")


@torch.no_grad()
def test_bypassed_set_with_per_depth_deltas_exports_its_depth_merged(tmp_path):
    """Per-depth deltas: each exported set's bypass blocks hold W + B_k A_k of its depth k, so a prefix, a
    deeper prefix and a set that is no prefix (run at the depth of the smallest prefix holding it) each give
    phi3skip's logits for that set."""
    from phi3skip.model import bypass

    folder, _ = student(tmp_path, "medium-gqa")
    model = phi3skip.from_pretrained(folder)
    bypass.attach(model, [2, 1], rank=8, depth_rank=2)
    for name, p in model.skip_adapters.named_parameters():
        p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.3)
    withad = tmp_path / "with-deltas"
    phi3skip.save_pretrained(model, withad, extra_json={"skip.json": {**PROFILE, "layers": [2, 1]}})
    x = tokens(9)[:1]
    for skip in ((2,), (2, 1), (1,)):
        out = export(withad, skip=",".join(map(str, skip)), out=tmp_path / f"deci-{'-'.join(map(str, skip))}",
                     warn=lambda m: None)
        assert [s.layer for s in out.slots if s.bypass] == sorted(skip)
        ref = model(x, skip=skip)
        torch.testing.assert_close(nas_logits(out.folder, x, tmp_path), ref, rtol=1e-4, atol=1e-4)
        shared = {i: model.skip_adapters.bypass[str(i)] for i in skip}  # the deltas matter: without them, other logits
        assert (model.lm_head(model.hidden_states(x, skip, bypasses=shared)) - ref).abs().max() > 1e-2
