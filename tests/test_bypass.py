"""Skip adapters over a frozen base: the restart forwards, the least-squares bypass, saving and loading, the
adapter training step, the sandwich schedule, the greedy layer order, and per-depth deltas (exact at zero, each
depth its own, merged exactly, saved, trained, decoded)."""
import json

import pytest
import torch

from phi3skip import UserError, from_pretrained, save_pretrained
from phi3skip.model import bypass
from phi3skip.train import bypass_init
from phi3skip.model.config import Phi3Config
from phi3skip.train.distill import LossConfig, Schedule, adapter_step, chunked_kd_loss
from phi3skip.eval.importance import greedy_order
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
                                              "form": "sequential", "depth_rank": 0, "layers": [4, 2]}
    assert not any(k.startswith("skip_adapters") for k in model.base_state_dict())


@torch.no_grad()
def test_least_squares_bypass_beats_the_naive_skip_and_full_rank_is_the_exact_solution():
    model = tiny(std=0.2)
    calib = [tokens(B=4, T=16, seed=s) for s in range(4)]
    x = torch.cat(calib)  # a random model does not generalise: score on the calibration text itself
    naive = [kl_of(model, x, (4,)), kl_of(model, x, (4, 1))]
    bypass.attach(model, [4, 1], rank=32)  # rank = hidden size: the unconstrained least squares
    bypass_init.fit_lstsq(model, calib, [4, 1], ridge=0.0)
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
    d, u = bypass_init.reduced_rank(w, X.T @ X, 4)
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
    bypass_init.fit_lstsq(model, calib, [4], ridge=0.0)
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
    bypass_init.fit_lstsq(model, calib, [4])
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
    bypass_init.fit_lstsq(model, [tokens(B=4, T=16, seed=s) for s in range(2)], [4, 2])
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
    with pytest.raises(UserError, match="field .adapters.kind. must be .bypass."):
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
    from phi3skip.train import distill

    model = tiny()
    batches = [(tokens(B=2, T=16, seed=s), None) for s in range(2)]
    full = greedy_order(model, batches, 3)
    assert greedy_order(model, batches, 3, shortlist=5) == full  # all 5 remaining layers: the full greedy
    scored: list[int] = []
    real = distill.SkipKL.__call__
    monkeypatch.setattr(distill.SkipKL, "__call__", lambda self, skip, *a: scored.append(skip[-1]) or real(self, skip, *a))
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
    bypass_init.fit_lstsq(model, fit, [4, 1], ridge=1e-6)  # unchecked: rank 32 on 24 tokens overfits
    unchecked = kl_of(model, x, (4,))
    assert unchecked > plain  # the case the check exists for
    forms = bypass_init.fit_lstsq(model, fit, [4, 1], ridge=1e-6, check=check)
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
    with pytest.raises(UserError, match="field 'adapters.form' must be 'sequential' or 'parallel', got \"diagonal\""):
        from_pretrained(tmp_path / "s")


# Per-depth deltas -------------------------------------------------------------------------------------------------
ORDER = (1, 4, 2)  # depth k skips ORDER[:k]; layer 1 runs at every depth, 2 only at the deepest
SETS = [(1,), (1, 4), (1, 4, 2), (4, 2), (2,), (4,)]  # the prefixes, then sets that are not one


@torch.no_grad()
def randomise(adapters, which: str = "") -> None:
    """Give the adapters' parameters whose names contain `which` random values (norms near 1)."""
    g = torch.Generator().manual_seed(len(which))
    for name, p in adapters.named_parameters():
        if which in name:
            r = torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.3
            p.copy_(r)


def with_deltas(q: int = 3, mlp: int = 4):
    """A tiny model with trained-looking bypasses for ORDER and fresh rank-q deltas; logits of SETS without them."""
    model = tiny(std=0.2)
    bypass.attach(model, ORDER, rank=8, mlp=mlp)
    randomise(model.skip_adapters)
    x = tokens()
    with torch.no_grad():
        plain = {s: model(x, s) for s in SETS}
    shared = model.skip_adapters.state_dict()
    bypass.attach(model, ORDER, rank=8, mlp=mlp, depth_rank=q)
    assert not model.skip_adapters.load_state_dict(shared, strict=False).unexpected_keys
    return model, x, plain


@torch.no_grad()
def test_fresh_depth_deltas_change_nothing_and_are_reproducible():
    model, x, plain = with_deltas()
    a = model.skip_adapters
    for s in SETS:
        assert torch.equal(model(x, s), plain[s]), s  # B = 0: bit for bit today's bypasses
    assert [a.depth(s) for s in SETS] == [1, 2, 3, 3, 3, 2]  # the smallest trained prefix holding the set
    assert sorted(a.bypass["1"].depth) == ["1", "2", "3"] and sorted(a.bypass["2"].depth) == ["3"]
    d = a.bypass["4"].depth["2"]
    assert (d.down.A.shape, d.down.B.shape, d.mlp.gate_up_proj.A.shape, d.mlp.down_proj.B.shape) == \
        ((3, 32), (8, 3), (3, 32), (32, 3))
    assert not d.down.B.any() and d.down.A.abs().max() <= 1 and 0.45 < d.down.A.pow(2).mean().sqrt() < 0.7  # 1/sqrt(3)
    again = bypass.SkipAdapters(ORDER, 32, 8, 1e-5, 4, depth_rank=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in a.state_dict().items() if ".depth." in k)
    assert model.skip_adapters.describe()["depth_rank"] == 3
    linear = bypass.SkipAdapters(ORDER, 32, 8, 1e-5, 0, depth_rank=2)  # no MLP: deltas of the map only
    assert sorted(linear.bypass["1"].depth["1"]) == ["down", "up"]


@torch.no_grad()
def test_each_depth_runs_its_own_deltas_and_the_merged_bypasses_equal_them():
    model, x, plain = with_deltas()
    a = model.skip_adapters
    randomise(a, ".B")
    for s in SETS:
        got = model(x, s)
        assert (got - plain[s]).abs().max() > 0.1, s  # the deltas are in use
        merged = bypass.merged(a, s)
        assert all(type(b) is bypass.Bypass and not len(b.depth) for b in merged.values())
        torch.testing.assert_close(model.lm_head(model.hidden_states(x, s, bypasses=merged)), got, rtol=0, atol=1e-6)
    # a set that is no prefix runs at the depth of the smallest prefix holding it: (4, 2) as (1, 4, 2) does
    k3 = {i: lambda h, i=i: a.bypass[str(i)](h, depth=3) for i in (4, 2)}
    assert torch.equal(model.lm_head(model.hidden_states(x, (4, 2), bypasses=k3)), model(x, (4, 2)))
    h = torch.randn(2, 5, 32)
    b = a.bypass["1"]
    outs = [b(h, depth=k) for k in (1, 2, 3)]
    assert all((outs[i] - outs[j]).abs().max() > 1e-2 for i, j in ((0, 1), (0, 2), (1, 2)))
    merged = b.merged(2)
    assert torch.equal(merged(h), outs[1])
    assert torch.equal(merged.down.weight, b.down.weight + b.depth["2"].down.B @ b.depth["2"].down.A)
    assert not any(p.requires_grad for p in merged.parameters())
    # without deltas the merged bypasses are the adapters' own modules
    plain_model = tiny()
    bypass.attach(plain_model, ORDER, rank=8)
    assert bypass.merged(plain_model.skip_adapters, (4, 2))[4] is plain_model.skip_adapters.bypass["4"]


@torch.no_grad()
def test_branches_split_where_sets_run_a_bypass_at_different_depths():
    """(1,) and (1, 4) skip layer 1 alike but run its bypass at depths 1 and 2: their streams part there."""
    model, x, _ = with_deltas()
    randomise(model.skip_adapters, ".B")
    sets = [()] + SETS
    for h, s in zip(model.forward_branches(x, sets), sets):
        torch.testing.assert_close(h, model.hidden_states(x, s), rtol=0, atol=1e-6)
    assert [model.slot(1, frozenset(s)) for s in ((), (1,), (1, 4), (4,))] == [-1, 1, 2, -1]
    assert model.slot(3, frozenset((1, 3))) == 0  # skipped without a bypass


def test_adapter_step_trains_only_the_deltas_of_the_depths_it_runs():
    model, x, _ = with_deltas()
    randomise(model.skip_adapters, ".B")
    params = bypass.set_trainable(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(".depth." in names[id(p)] for p in params)
    adapter_step(model, x, x, [(1, 4, 2), (1,)], LossConfig(kd_weight=1.0))
    for name, p in model.skip_adapters.named_parameters():
        depth = name.split(".depth.")[1].split(".")[0] if ".depth." in name else None
        assert (p.grad is not None) == (depth in (None, "1", "3")), name  # depth 2 ran in no pass
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, name


def test_depth_deltas_save_and_load(tmp_path):
    model, x, _ = with_deltas(q=2)
    randomise(model.skip_adapters, ".B")
    save_pretrained(model, tmp_path / "s", extra_json={"skip.json": {"layers": list(ORDER)}})
    prof_path = tmp_path / "s" / "skip.json"
    prof = json.loads(prof_path.read_text())
    assert prof["adapters"]["depth_rank"] == 2
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "s" / bypass.FILE)
    assert saved["layers.4.depth.2.down.A"].shape == (2, 32)
    assert saved["layers.2.depth.3.mlp.down_proj.B"].shape == (32, 2)
    assert not any(k.startswith("layers.2.depth.1.") for k in saved)  # layer 2 runs at the deepest set only
    back = from_pretrained(tmp_path / "s")
    assert back.skip_adapters.depth_rank == 2
    with torch.no_grad():
        for s in SETS:
            assert torch.equal(back(x, s), model(x, s)), s
    prof_path.write_text(json.dumps({**prof, "adapters": {**prof["adapters"], "depth_rank": 3}}))
    with pytest.raises(UserError, match=r"do not match .*depth rank 3") as e:
        from_pretrained(tmp_path / "s")
    assert "\n" not in str(e.value)
    prof_path.write_text(json.dumps({**prof, "adapters": {**prof["adapters"], "depth_rank": -1}}))
    with pytest.raises(UserError, match="field .adapters.depth_rank. must be an integer 0..32 .at most the hidden size., got -1"):
        from_pretrained(tmp_path / "s")
    plain = tiny()  # written before per-depth deltas: skip.json's adapters without depth_rank load as none
    bypass.attach(plain, [4], rank=8)
    save_pretrained(plain, tmp_path / "old", extra_json={"skip.json": {"layers": [4]}})
    old = json.loads((tmp_path / "old" / "skip.json").read_text())
    del old["adapters"]["depth_rank"]
    (tmp_path / "old" / "skip.json").write_text(json.dumps(old))
    assert from_pretrained(tmp_path / "old").skip_adapters.depth_rank == 0


def test_generator_decodes_with_the_merged_bypasses_of_its_depth():
    """Plain and speculative decoding (verifier at depth 1, draft at depth 2: only the layers below the first
    bypass share a cache) give greedy recomputation's tokens; so do the compiled layers and the compiled step."""
    from phi3skip.serve.generate import Generator

    model, _, _ = with_deltas()
    randomise(model.skip_adapters, ".B")
    model.eval()
    ids = tokens(B=1, T=6, seed=3)[0].tolist()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(8):
                seq.append(int(model(torch.tensor([seq]), skip=(1,))[0, -1].argmax()))
        ref = seq[len(ids):]
        gen = Generator(model, (1,), column_major=False)
        assert not len(gen.bypasses["decode"][1].depth)  # merged: W + B A folded in, no deltas left
        assert gen.generate([ids], 8).tokens[0] == ref
        spec = Generator(model, (1,), draft_skip=(1, 4), lookahead=2)
        assert spec.shared_layers == [0]  # not 0..3: layer 1's bypass runs at another depth in the draft
        assert spec.generate([ids], 8).tokens[0] == ref
        assert Generator(model, (1,), compile=True).generate([ids], 8).tokens[0] == ref
        assert Generator(model, (1,), compile="step").generate([ids], 8).tokens[0] == ref
        # the unmerged path traces too (a model compiled whole): for_skip's depth and partials in one graph
        a, h = model.skip_adapters, torch.randn(1, 3, 32)
        run = torch.compile(lambda h: [b(h) for b in a.for_skip((1, 4)).values()], fullgraph=True)
        with torch.no_grad():
            for got, want in zip(run(h), [a.bypass["1"](h, depth=2), a.bypass["4"](h, depth=2)]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def test_attention_dropped_slot_keeps_its_blocks_ffn(tmp_path):
    """Rank 0: no map, no input norm; the slot runs x + mlp(mlp_norm(x)). Its least-squares start copies the
    block's whole MLP (the default width at rank 0), so it computes the block with its attention removed; it saves,
    loads, merges and costs as that."""
    from phi3skip.model.cost import BypassShape

    model = tiny(std=0.2)
    cfg = model.config
    bypass.attach(model, [4, 1], rank=0)
    byp = model.skip_adapters.bypass["4"]
    assert byp.down is None and byp.norm is None and byp.mlp.down_proj.weight.shape[1] == cfg.intermediate_size
    assert model.skip_adapters.describe()["rank"] == 0
    x = tokens()
    assert torch.equal(model(x, (4,)), model(x, (4,)))
    forms = bypass_init.fit_lstsq(model, [tokens(B=4, T=16, seed=s) for s in range(2)], [4, 1])
    assert forms == {4: "its block's MLP channels", 1: "its block's MLP channels"}
    block = model.model.layers[4]
    h = model.residuals(x)[4]
    no_attention = h + block.mlp(block.post_attention_layernorm(h))
    torch.testing.assert_close(byp(h), no_attention, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bypass.merged(model.skip_adapters, [4])[4](h), byp(h))
    save_pretrained(model, tmp_path / "s", extra_json={"skip.json": {"layers": [4, 1]}})
    back = from_pretrained(tmp_path / "s")
    for skip in [(4,), (4, 1)]:
        assert torch.equal(back(x, skip), model(x, skip))
    shape = BypassShape.from_description(model.skip_adapters.describe())
    assert shape.weights(cfg.hidden_size) == 3 * cfg.intermediate_size * cfg.hidden_size
    assert shape.norm_weights(cfg.hidden_size) == cfg.hidden_size
    with pytest.raises(UserError, match="run nothing"):
        bypass.attach(tiny(), [4], rank=0, mlp=0)
