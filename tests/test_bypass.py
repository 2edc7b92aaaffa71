"""Skip adapters over a frozen base: the restart forwards, the least-squares bypass, saving and loading, the
adapter training step, the sandwich schedule and the greedy layer order."""
import json

import pytest
import torch

from phi3skip import UserError, from_pretrained, save_pretrained
from phi3skip import bypass
from phi3skip.config import Phi3Config
from phi3skip.distill import LossConfig, Schedule, adapter_step, chunked_kd_loss
from phi3skip.importance import greedy_order
from test_distill import tiny, tokens


def kl_of(model, x, skip):
    with torch.no_grad():
        w = model.lm_head.weight
        return chunked_kd_loss(model.hidden_states(x), w, [model.hidden_states(x, skip)], w, [1.0])[1][0].item()


@torch.no_grad()
def test_restart_from_residuals_equals_a_full_forward():
    model = tiny()
    x = tokens()
    trace = model.residuals(x)
    assert len(trace) == model.num_layers + 1
    torch.testing.assert_close(model.model.norm(trace[-1]), model.hidden_states(x))
    for skip in [(3,), (4, 2), (5, 3, 1)]:
        lo = min(skip)
        torch.testing.assert_close(model.hidden_from(lo, trace[lo], skip), model.hidden_states(x, skip),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="below the restart layer"):
        model.hidden_from(3, trace[3], (1,))


@torch.no_grad()
def test_fresh_bypass_is_the_naive_skip_and_full_path_is_untouched():
    model = tiny()
    x = tokens()
    full, naive = model(x), model(x, (4, 2))
    bypass.attach(model, [4, 2], rank=8, mlp=4)
    assert torch.equal(model(x), full)
    torch.testing.assert_close(model(x, (4, 2)), naive)
    assert model.skip_adapters.describe() == {"file": bypass.FILE, "kind": "bypass", "rank": 8, "mlp": 4,
                                              "form": "sequential",
                                              "layers": [4, 2]}
    assert not any(k.startswith("skip_adapters") for k in model.base_state_dict())


@torch.no_grad()
def test_least_squares_bypass_beats_the_naive_skip_and_full_rank_is_the_exact_solution():
    model = tiny(std=0.2)
    calib = [tokens(B=4, T=16, seed=s) for s in range(4)]
    x = torch.cat(calib)  # a random model does not generalise: score on the calibration text itself
    naive = [kl_of(model, x, (4,)), kl_of(model, x, (4, 1))]
    bypass.attach(model, [4, 1], rank=32)  # rank = hidden size: the unconstrained least squares
    bypass.fit_lstsq(model, calib, [4, 1], ridge=0.0)
    fitted = [kl_of(model, x, (4,)), kl_of(model, x, (4, 1))]
    assert fitted[0] < 0.5 * naive[0] and fitted[1] < 0.5 * naive[1]
    # layer 4's bypass is the least-squares solution on its own inputs (layer 1 is fitted after it)
    b = model.skip_adapters.bypass["4"]
    xs, ys = [], []
    for t in calib:
        tr = model.residuals(t)
        xs.append(b.norm(tr[4]).reshape(-1, 32))
        ys.append((tr[5] - tr[4]).reshape(-1, 32))
    X, Y = torch.cat(xs).double(), torch.cat(ys).double()
    w = torch.linalg.lstsq(X, Y).solution
    got = (b.up.weight @ b.down.weight).T.double()
    torch.testing.assert_close(got, w, rtol=1e-3, atol=1e-4)
    # a lower rank is the best rank-r map in the data's metric: no worse a fit than truncating w's SVD
    d, u = bypass.reduced_rank(w, X.T @ X, 4)
    u_, s_, vh_ = torch.linalg.svd(w)
    plain = (u_[:, :4] * s_[:4]) @ vh_[:4]
    assert ((X @ (d.double() @ u.double()) - Y).norm() <= (X @ plain - Y).norm() + 1e-9)


@torch.no_grad()
def test_bypass_mlp_starts_from_the_blocks_most_active_channels_and_least_squares_fits_the_rest():
    model = tiny(std=0.2)
    calib = [tokens(B=4, T=16, seed=s) for s in range(3)]
    block = model.model.layers[4]
    I = model.config.intermediate_size
    bypass.attach(model, [4], rank=32, mlp=I)  # every channel: the bypass's MLP is the block's
    bypass.fit_lstsq(model, calib, [4], ridge=0.0)
    b = model.skip_adapters.bypass["4"]
    xs, ys = [], []
    for t in calib:
        tr = model.residuals(t)
        mlp = block.mlp(block.post_attention_layernorm(tr[4]))
        torch.testing.assert_close(b.mlp(b.mlp_norm(tr[4])), mlp, rtol=1e-5, atol=1e-6)
        xs.append(b.norm(tr[4]).reshape(-1, 32))
        ys.append((tr[5] - tr[4] - mlp).reshape(-1, 32))
    w = torch.linalg.lstsq(torch.cat(xs).double(), torch.cat(ys).double()).solution  # the map fits what is left
    torch.testing.assert_close((b.up.weight @ b.down.weight).T.double(), w, rtol=1e-3, atol=1e-4)
    # a narrower MLP keeps the channels with the largest mean |activation| x |down column|, in the block's order
    bypass.attach(model, [4], rank=8, mlp=5)
    bypass.fit_lstsq(model, calib, [4])
    acts = []
    for t in calib:
        gate, up = block.mlp.gate_up_proj(block.post_attention_layernorm(model.residuals(t)[4])).chunk(2, -1)
        acts.append((up * torch.nn.functional.silu(gate)).reshape(-1, I))
    score = torch.cat(acts).abs().mean(0) * block.mlp.down_proj.weight.norm(dim=0)
    keep = score.topk(5).indices.sort().values
    b = model.skip_adapters.bypass["4"]
    assert torch.equal(b.mlp.down_proj.weight, block.mlp.down_proj.weight[:, keep])
    assert torch.equal(b.mlp.gate_up_proj.weight[5:], block.mlp.gate_up_proj.weight[I + keep])  # the up rows


def test_save_and_load_round_trip_keeps_a_plain_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny(std=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    bypass.attach(model, [4, 2], rank=8, mlp=4)
    bypass.fit_lstsq(model, [tokens(B=4, T=16, seed=s) for s in range(2)], [4, 2])
    save_pretrained(model, tmp_path / "s", extra_json={"skip.json": {"layers": [4, 2]}})
    prof = json.loads((tmp_path / "s" / "skip.json").read_text())
    assert prof["adapters"]["layers"] == [4, 2] and (tmp_path / "s" / bypass.FILE).is_file()
    back = from_pretrained(tmp_path / "s")
    x = tokens()
    with torch.no_grad():
        for skip in [(), (4,), (4, 2), (2,), (3,)]:
            assert torch.equal(back(x, skip), model(x, skip)), skip
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s")  # the plain base, as saved
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-4)


def test_damaged_adapter_files_are_one_line_errors(tmp_path):
    model = tiny()
    bypass.attach(model, [4], rank=8, mlp=0)
    save_pretrained(model, tmp_path / "s", extra_json={"skip.json": {"layers": [4]}})
    prof_path = tmp_path / "s" / "skip.json"
    prof = json.loads(prof_path.read_text())
    del prof["adapters"]["mlp"]  # as phi3skip wrote it before the bypass had an MLP: a linear bypass
    prof_path.write_text(json.dumps(prof))
    assert from_pretrained(tmp_path / "s").skip_adapters.mlp == 0
    (tmp_path / "s" / bypass.FILE).write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a readable safetensors"):
        from_pretrained(tmp_path / "s")
    prof_path.write_text(json.dumps({**prof, "adapters": {**prof["adapters"], "rank": 16}}))
    with pytest.raises(UserError, match="not a readable|do not match"):
        from_pretrained(tmp_path / "s")
    prof_path.write_text(json.dumps({**prof, "adapters": {**prof["adapters"], "kind": "pickle"}}))
    with pytest.raises(UserError, match="unknown skip-adapter kind"):
        from_pretrained(tmp_path / "s")
    prof_path.write_text(json.dumps({**prof, "adapters": {**prof["adapters"], "mlp": 10 ** 6}}))
    with pytest.raises(UserError, match="MLP width"):
        from_pretrained(tmp_path / "s")
    (tmp_path / "s" / bypass.FILE).unlink()
    prof_path.write_text(json.dumps(prof))
    with pytest.raises(UserError, match="missing"):
        from_pretrained(tmp_path / "s")


def test_adapter_step_trains_only_adapters_and_lowers_the_skip_kl():
    model = tiny(std=0.2)
    bypass.attach(model, [4, 2], rank=8)
    params = bypass.set_trainable(model)
    assert all(p.requires_grad == any(p is q for q in params) for p in model.parameters())
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    opt = torch.optim.Adam(params, lr=1e-2)
    x = tokens(B=4, T=16)
    first = None
    for _ in range(30):
        stats = adapter_step(model, x, x, [(4, 2), (4,)], LossConfig(kd_weight=1.0))
        first = stats[2].item() if first is None else first
        opt.step()
        opt.zero_grad()
    assert stats[1].item() == 0.0 and stats[2].item() < 0.5 * first
    # the stats' skip KL is the mean of the two passes' KL, computed directly
    want = (kl_of(model, x, (4, 2)) + kl_of(model, x, (4,))) / 2
    assert adapter_step(model, x, x, [(4, 2), (4,)], LossConfig(kd_weight=1.0), backward=False)[2].item() \
        == pytest.approx(want, rel=1e-4)
    assert all(torch.equal(v, base[k]) for k, v in model.base_state_dict().items())  # the base never moves


def test_alignment_adds_each_skip_pass_s_rejoin_mse_and_its_gradient_reaches_the_bypasses():
    model = tiny(std=0.2)
    L = model.num_layers
    bypass.attach(model, [L - 1, 4, 2, 1], rank=8)
    bypass.set_trainable(model)
    x = tokens(B=4, T=16)
    sets = [(L - 1, 4, 2, 1), (4,)]
    plain = adapter_step(model, x, x, sets, LossConfig(kd_weight=0.5), backward=False)[0].item()
    aligned = adapter_step(model, x, x, sets, LossConfig(kd_weight=0.5, align_weight=2.0))[0].item()
    with torch.no_grad():  # by hand: the residual entering each layer that runs after a skipped one, and the output
        full = model.residuals(x)
        want = 0.0
        for s, rejoin in zip(sets, [(3, L), (5,)]):  # 4 and L - 1 = 5 run together: they rejoin at L
            student = model.residuals(x, s)
            for r in rejoin:
                rms = full[r].pow(2).mean(dim=(0, 1)).sqrt()
                want += ((student[r] - full[r]) / rms).pow(2).mean().item()
    assert want > 0.1 and aligned - plain == pytest.approx(0.5 * 2.0 * want, rel=1e-4)
    ups = [p for n, p in model.skip_adapters.named_parameters() if n.endswith(".up.weight")]
    assert len(ups) == 4 and all(p.grad.abs().sum() > 0 for p in ups)  # every bypass's map gets a gradient


def test_sandwich_schedule_trains_the_deepest_set_and_one_below():
    s = Schedule("nested", (5, 3, 1, 0), 100, seed=1, k_dist="sandwich")
    sets = [s.skip_sets(i) for i in range(100)]
    assert all(a == (5, 3, 1, 0) and 1 <= len(b) <= 3 and b == (5, 3, 1, 0)[:len(b)] for a, b in sets)
    assert {len(b) for _, b in sets} == {1, 2, 3}
    assert Schedule("nested", (5,), 10, k_dist="sandwich").skip_sets(3) == [(5,)]
    assert Schedule("nested", (5, 3), 10, seed=2).skip_sets(7) == [Schedule("nested", (5, 3), 10, seed=2).skip(7)]
    with pytest.raises(UserError, match="k distribution"):
        Schedule("nested", (5,), 10, k_dist="zipf")


def test_harmonic_schedule_draws_two_depths_favouring_small_k():
    layers = (5, 3, 1, 0)
    s = Schedule("nested", layers, 4000, seed=1, k_dist="harmonic")
    sets = [s.skip_sets(i) for i in range(4000)]
    assert all(len(a) > len(b) >= 1 and a == layers[:len(a)] and b == layers[:len(b)] for a, b in sets)
    # P(k in the pair) for draws without replacement, P(k) ~ 1/k over 1..4: k=1 0.79 ... k=4 0.29
    share = {k: sum(k in (len(a), len(b)) for a, b in sets) / len(sets) for k in range(1, 5)}
    assert share[1] > share[2] > share[3] > share[4] and 0.76 < share[1] < 0.82
    assert s.skip_sets(7) == Schedule("nested", layers, 4000, seed=1, k_dist="harmonic").skip_sets(7)


@torch.no_grad()
def test_greedy_order_picks_the_identity_layer_then_conditions_on_it():
    model = tiny()
    model.model.layers[3].self_attn.o_proj.weight.zero_()  # an identity block: free to skip
    model.model.layers[3].mlp.down_proj.weight.zero_()
    batches = [(tokens(B=2, T=16, seed=s), None) for s in range(2)]
    order = greedy_order(model, batches, 3)
    assert order[0][0] == 3 and order[0][1] < 1e-7
    x = torch.cat([b for b, _ in batches])
    for k in (2, 3):  # each pick is the best next layer given those before it, by direct computation
        prev = [layer for layer, _ in order[:k - 1]]
        kls = {c: kl_of(model, x, prev + [c]) for c in range(6) if c not in prev}
        assert order[k - 1][0] == min(kls, key=kls.get)
        assert order[k - 1][1] == pytest.approx(kls[order[k - 1][0]], rel=1e-4)


@torch.no_grad()
def test_greedy_shortlist_rescores_only_the_layers_that_added_least(monkeypatch):
    from phi3skip import evaluate

    model = tiny()
    batches = [(tokens(B=2, T=16, seed=s), None) for s in range(2)]
    full = greedy_order(model, batches, 3)
    assert greedy_order(model, batches, 3, shortlist=5) == full  # all 5 remaining layers: the full greedy
    scored: list[int] = []
    real = evaluate.SkipKL.__call__
    monkeypatch.setattr(evaluate.SkipKL, "__call__", lambda self, skip, *a: scored.append(skip[-1]) or real(self, skip, *a))
    lazy = greedy_order(model, batches, 3, shortlist=2)
    assert len(scored) == 6 + 2 + 2  # every layer at the first pick, then only the shortlist
    x = torch.cat([b for b, _ in batches])
    alone = sorted(range(6), key=lambda c: kl_of(model, x, [c]))
    assert lazy[0] == full[0] and alone[0] == full[0][0]
    assert set(scored[6:8]) == set(alone[1:3])  # the second pick weighs the two that added least at the first
    with pytest.raises(ValueError, match="shortlist"):
        greedy_order(model, batches, 2, shortlist=0)


@torch.no_grad()
def test_greedy_order_with_bypasses_scores_each_layer_as_served():
    # A block that adds a linear map of its normalised input is what a full-rank bypass replaces exactly: scored
    # with bypasses it costs nothing, while dropping it costs a lot.
    model = tiny(std=0.2)
    lin = 2
    blk = model.model.layers[lin]
    linear = bypass.Bypass(32, 32, model.config.rms_norm_eps)
    linear.norm.weight.copy_(blk.input_layernorm.weight)
    linear.down.weight.normal_(0, 0.3)
    linear.up.weight.normal_(0, 0.3)
    blk.forward = lambda h, *a, **k: linear(h)
    batches = [(tokens(B=2, T=16, seed=s), None) for s in range(2)]
    x = torch.cat([b for b, _ in batches])
    dropped = kl_of(model, x, (lin,))
    bypass.attach(model, range(model.num_layers), rank=32)
    fit = [tokens(B=2, T=16, seed=10 + s) for s in range(2)]  # other tokens than those scored
    order = greedy_order(model, batches, 2, bypass_fit=fit)
    assert order[0][0] == lin and order[0][1] < 1e-3 * dropped
    # each pick's KL is that of the model serving the chosen set with the bypasses the order fitted
    assert order[1][1] == pytest.approx(kl_of(model, x, [layer for layer, _ in order]), rel=1e-4)


@torch.no_grad()
def test_checked_fit_keeps_the_form_with_the_lowest_kl_a_plain_skip_included():
    model = tiny(std=0.2)
    fit, check = [tokens(B=1, T=24, seed=0)], [tokens(B=4, T=16, seed=s) for s in (5, 6)]
    x = torch.cat(check)
    plain = kl_of(model, x, (4,))
    bypass.attach(model, [4, 1], rank=32, mlp=8)
    bypass.fit_lstsq(model, fit, [4, 1], ridge=1e-6)  # unchecked: rank 32 on 24 tokens overfits
    unchecked = kl_of(model, x, (4,))
    assert unchecked > plain  # the case the check exists for
    forms = bypass.fit_lstsq(model, fit, [4, 1], ridge=1e-6, check=check)
    assert list(forms) == [4, 1]
    assert kl_of(model, x, (4,)) <= min(plain, unchecked) + 1e-7
    b = model.skip_adapters.bypass["4"]
    if forms[4] == "none (plain skip)":
        assert not b.up.weight.any() and not b.mlp.down_proj.weight.any()
    else:  # the kept form keeps its MLP channels
        assert b.mlp.down_proj.weight.any()


def test_default_bypass_sizes_spend_about_8_percent_of_a_block_mostly_on_mlp_channels():
    base = dict(model_type="phi3", max_position_embeddings=4096, original_max_position_embeddings=4096,
                rms_norm_eps=1e-5)
    smollm2 = Phi3Config.from_dict({**base, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                                    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3})
    mini = Phi3Config.from_dict({**base, "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32})
    assert bypass.default_sizes(smollm2) == (64, 128) and bypass.default_sizes(mini) == (320, 768)
    for cfg, block in ((smollm2, 3_538_944), (mini, 113_246_208)):  # a block's weights, counted by hand
        rank, mlp = bypass.default_sizes(cfg)
        cost = (2 * rank + 3 * mlp) * cfg.hidden_size
        assert 0.07 < cost / block < 0.09 and 3 * mlp > 2 * 2 * rank


@torch.no_grad()
def test_sequential_bypass_is_a_block_and_old_files_load_as_parallel(tmp_path):
    """The default bypass runs its MLP on the stream its map updated (a block: map in attention's place, then the
    MLP); a student saved before that form (skip.json's adapters without "form") loads as the parallel form."""
    model = tiny(std=0.2)
    bypass.attach(model, [4], rank=8, mlp=4)
    b = model.skip_adapters.bypass["4"]
    for p in b.parameters():
        p.normal_(0, 0.3)
    x = torch.randn(2, 5, 32)
    h = x + b.up(b.down(b.norm(x)))
    torch.testing.assert_close(b(x), h + b.mlp(b.mlp_norm(h)))
    save_pretrained(model, tmp_path / "s", extra_json={"skip.json": {"layers": [4]}})
    prof = json.loads((tmp_path / "s" / "skip.json").read_text())
    assert prof["adapters"]["form"] == "sequential"
    del prof["adapters"]["form"]
    (tmp_path / "s" / "skip.json").write_text(json.dumps(prof))
    old = from_pretrained(tmp_path / "s").skip_adapters.bypass["4"]
    assert old.form == "parallel"
    torch.testing.assert_close(old(x), h + b.mlp(b.mlp_norm(x)))
    prof["adapters"]["form"] = "diagonal"
    (tmp_path / "s" / "skip.json").write_text(json.dumps(prof))
    with pytest.raises(UserError, match="unknown bypass form 'diagonal'"):
        from_pretrained(tmp_path / "s")
