"""The distillation pieces on tiny random models: chunked KL against a direct reference, shared-prefix
branches, where the skip term's gradient goes, the schedules, and perplexity."""
import math

import pytest
import torch
import torch.nn.functional as F

from phi3skip import Phi3Config, Phi3ForCausalLM, UserError
from phi3skip.train.distill import (IGNORE_INDEX, LossConfig, Schedule, block_index, chunked_kd_loss, distill_step,
                                    kd_chunk, set_trainable, step_flops_per_token, trainable_blocks)
from phi3skip.eval.evaluate import perplexity, token_nll
from phi3skip.model.skipsets import default_layers, parse_layers

CFG = dict(model_type="phi3", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           original_max_position_embeddings=64, rms_norm_eps=1e-5, torch_dtype="float32")


def tiny(seed=0, std=0.1, **kw):
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config.from_dict({**CFG, **kw}))
    model.init_weights(std)
    return model


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_loss(ht, wt, hs, ws, weights, tau, labels=None, ce_weight=0.0):
    """The original way: full-vocabulary fp32 logits, softmax of both, KL averaged over tokens."""
    logp = torch.log_softmax((ht @ wt.T).float() / tau, -1)
    loss = 0
    for h, w in zip(hs, weights):
        logq = torch.log_softmax((h @ ws.T).float() / tau, -1)
        loss = loss + w * tau ** 2 * F.kl_div(logq, logp, log_target=True, reduction="batchmean")
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy((hs[0] @ ws.T).float(), labels, ignore_index=-100)
    return loss


@pytest.mark.parametrize("tau,ce,chunk", [(1.0, 0.0, 7), (2.0, 0.0, 64), (1.0, 0.5, 5), (1.5, 0.3, 1000)])
def test_chunked_kl_equals_direct_reference(tau, ce, chunk):
    g = torch.Generator().manual_seed(1)
    N, H, V = 41, 16, 97
    ht, wt = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / 2
    h1 = torch.randn(N, H, generator=g).requires_grad_()
    h2 = torch.randn(N, H, generator=g).requires_grad_()
    ws = (torch.randn(V, H, generator=g) / 2).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    loss, stats = chunked_kd_loss(ht, wt, [h1, h2], ws, [1.0, 0.25], tau, labels, ce, chunk=chunk)
    ref = reference_loss(ht, wt, [h1, h2], ws, [1.0, 0.25], tau, labels, ce)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ours = torch.autograd.grad(loss, [h1, h2, ws])
    theirs = torch.autograd.grad(ref, [h1, h2, ws])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    kl1 = reference_loss(ht, wt, [h1], ws, [1.0], tau)
    assert stats[0].item() == pytest.approx(kl1.item(), rel=1e-5)


@pytest.mark.parametrize("tau,ce_weight,dtype", [(1.0, 0.0, torch.float32), (2.0, 0.0, torch.float32),
                                                  (1.0, 0.4, torch.float32), (1.7, 0.4, torch.float32),
                                                  (1.7, 0.4, torch.bfloat16)])
def test_kd_chunk_value_and_gradient_equal_autograd(tau, ce_weight, dtype):
    """The pure per-chunk function: its sums and its hand-derived logits gradient against autograd on the
    chunk's share of the loss, at each temperature, with and without CE (ignored tokens included)."""
    g = torch.Generator().manual_seed(3)
    n, H, V, N, n_ce, kl_weight = 9, 16, 97, 40, 5, 0.3
    hidden, weight = torch.randn(n, H, generator=g).to(dtype), (torch.randn(V, H, generator=g) / 2).to(dtype)
    logp = torch.log_softmax(2 * torch.randn(n, V, generator=g), dim=-1)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::3] = IGNORE_INDEX
    cfg = LossConfig(temperature=tau, kd_weight=0.5, ce_weight=ce_weight, chunk=n, dtype=dtype)
    inputs = [t.clone() for t in (hidden, weight, logp, labels)]
    kl, ce, grad = kd_chunk(hidden, weight, logp, logp.exp(), cfg, kl_weight, N, labels, n_ce)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (hidden, weight, logp, labels)))  # inputs untouched

    s = (hidden @ weight.T).float().requires_grad_()
    kl_ref = torch.sum(logp.exp() * (logp - torch.log_softmax(s / tau, dim=-1)))
    ce_ref = F.cross_entropy(s, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = kl_weight * tau ** 2 / N * kl_ref + ce_weight / n_ce * ce_ref
    (ref_grad,) = torch.autograd.grad(loss, s)
    assert kl.item() == pytest.approx(kl_ref.item(), rel=1e-5)
    assert ce is None if not ce_weight else ce.item() == pytest.approx(ce_ref.item(), rel=1e-5)
    assert grad.dtype == torch.float32 and grad.shape == (n, V)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    kl2, ce2, none = kd_chunk(hidden, weight, logp, logp.exp(), cfg, kl_weight, N, labels, n_ce, grad=False)
    assert none is None and torch.equal(kl2, kl) and (ce2 is None) == (ce is None)
    assert kd_chunk(hidden, weight, logp, logp.exp(), cfg, kl_weight, N)[1] is None  # no labels: no CE


def test_chunked_kl_bf16_projection_close():
    g = torch.Generator().manual_seed(2)
    N, H, V = 30, 32, 97
    ht, wt = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / 4
    h = torch.randn(N, H, generator=g).requires_grad_()
    ws = (torch.randn(V, H, generator=g) / 4).requires_grad_()
    loss, _ = chunked_kd_loss(ht, wt, [h], ws, [1.0], dtype=torch.bfloat16, chunk=8)
    ref = reference_loss(ht, wt, [h], ws, [1.0], 1.0)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=0.05)
    loss.backward()
    assert ws.grad.dtype == torch.float32 and h.grad.dtype == torch.float32


def test_no_grad_needed_computes_only_the_value():
    ht, wt = torch.randn(10, 8), torch.randn(20, 8)
    loss, stats = chunked_kd_loss(ht, wt, [torch.randn(10, 8)], torch.randn(20, 8), [1.0])
    assert not loss.requires_grad and stats.shape == (2,)


@torch.no_grad()
def test_forward_branches_equal_separate_passes():
    model = tiny()
    x = tokens()
    skips = [(), (4,), (4, 2), (5, 0)]
    outs = model.forward_branches(x, skips)
    for s, h in zip(skips, outs):
        torch.testing.assert_close(h, model.hidden_states(x, s), rtol=0, atol=1e-5)


def test_shared_prefix_gradient_equals_separate_passes():
    model = tiny()
    x = tokens()
    a, b = model.forward_branches(x, [(), (4,)])
    (a.square().mean() + 3 * b.square().mean()).backward()
    shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (model.hidden_states(x).square().mean() + 3 * model.hidden_states(x, (4,)).square().mean()).backward()
    separate = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert shared.keys() == separate.keys() and len(shared) == 2 + 6 * 6
    for n in shared:
        torch.testing.assert_close(shared[n], separate[n], rtol=1e-4, atol=1e-7)


def test_skip_term_gradient_reaches_trainable_parameters():
    """Only the skip term (the full term is zero while student == teacher): the skipped block gets no gradient,
    which is why the original recipe (train only that block) could not compensate; every other block does."""
    teacher, student = tiny(), tiny()
    x, y = tokens(), tokens(seed=1)
    stats = distill_step(student, teacher, x, y, [(4,)], LossConfig(kd_weight=1.0), backward=False)
    assert stats[1].item() == pytest.approx(0.0, abs=1e-6) and stats[2].item() > 1e-4
    with torch.no_grad():
        ht = teacher.hidden_states(x)
    full, skipped = student.forward_branches(x, [(), (4,)])
    loss, _ = chunked_kd_loss(ht, teacher.lm_head.weight, [full, skipped], student.lm_head.weight, [0.0, 1.0])
    loss.backward()  # the skip term alone
    grads = {}
    for n, p in student.named_parameters():
        i = block_index(n)
        grads.setdefault(i, 0.0)
        grads[i] += 0.0 if p.grad is None else p.grad.abs().sum().item()
    assert grads[4] == 0.0
    assert all(grads[i] > 0 for i in (0, 1, 2, 3, 5, None))


def test_train_scope_limits_what_trains_and_refuses_only_skipped():
    student, teacher = tiny(), tiny()
    blocks = trainable_blocks("around:1", 6, skip=(4,), current=(4,))
    assert blocks == {3, 4, 5}
    params = set_trainable(student, blocks)
    assert {block_index(n) for n, p in student.named_parameters() if p.requires_grad} == {3, 4, 5}
    distill_step(student, teacher, tokens(), tokens(seed=1), [(4,)], LossConfig(kd_weight=1.0))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters()
               if p.requires_grad and block_index(n) != 4)
    assert all(p.grad is None for p in student.parameters() if not p.requires_grad)
    assert len(params) == 3 * 6
    assert trainable_blocks("all", 6, (4,), (4,)) is None
    assert trainable_blocks("1-2,5", 6, (4,), (4,)) == {1, 2, 5}
    with pytest.raises(UserError, match="no gradient from the skip term"):
        trainable_blocks("4", 6, skip=(4,), current=(4,))
    for bad in ("around:x", "9", "2-x"):
        with pytest.raises(UserError, match="train-scope"):
            trainable_blocks(bad, 6, (4,), (4,))


def test_distill_step_loss_formula():
    teacher, student = tiny(0), tiny(1)
    x, y = tokens(), tokens(seed=1)
    cfg = LossConfig(temperature=2.0, kd_weight=0.3, ce_weight=0.1, chunk=5)
    stats = distill_step(student, teacher, x, y, [(5, 3)], cfg)
    loss, kl_full, kl_skip, ce = stats.tolist()
    with torch.no_grad():
        ht = teacher.hidden_states(x).flatten(0, 1)
        hf = student.hidden_states(x).flatten(0, 1)
        hsk = student.hidden_states(x, (5, 3)).flatten(0, 1)
        ref = reference_loss(ht, teacher.lm_head.weight, [hf, hsk], student.lm_head.weight, [1, 0.3], 2.0,
                             y.flatten(), 0.1)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert loss == pytest.approx(kl_full + 0.3 * kl_skip + 0.1 * ce, rel=1e-5)
    # k = 0 (no skip): one pass carries both terms, (1 + w) KL(T || S_full)
    stats0 = distill_step(student, teacher, x, y, [()], LossConfig(kd_weight=0.3), backward=False)
    assert stats0[0].item() == pytest.approx(1.3 * stats0[1].item(), rel=1e-6)


def test_forward_branches_is_a_model_method_fsdp_runs():
    from phi3skip.train.parallel import FORWARD_METHODS

    model = tiny()
    assert model.forward_branches.__self__ is model and "forward_branches" in FORWARD_METHODS


def test_layers_and_schedules():
    assert default_layers(32) == list(range(30, -1, -2))
    assert default_layers(5) == [3, 1]
    assert parse_layers(None, 32, 3) == [30, 28, 26]
    assert parse_layers("30, 28,26", 32) == [30, 28, 26]
    for text, msg in (("32", "out of range"), ("-1", "out of range"), ("3,3", "more than once"),
                      ("a", "comma-separated"), (",", "names no layer")):
        with pytest.raises(UserError, match=msg):
            parse_layers(text, 32)
    with pytest.raises(UserError, match="num-skip"):
        parse_layers("30,28", 32, 3)
    seq = Schedule("sequential", (30, 28, 26), 4)
    assert seq.total_steps == 12 and seq.num_phases == 3
    assert [seq.skip(s) for s in (0, 3, 4, 11)] == [(30,), (30,), (30, 28), (30, 28, 26)]
    assert seq.phase(7) == 1 and seq.phase_start(2) == 8
    nested = Schedule("nested", (30, 28, 26), 200, seed=3)
    ks = [len(nested.skip(s)) for s in range(200)]
    assert set(ks) == {0, 1, 2, 3}
    assert ks == [len(Schedule("nested", (30, 28, 26), 200, seed=3).skip(s)) for s in range(200)]  # same on every rank
    assert all(nested.skip(s) == (30, 28, 26)[:k] for s, k in enumerate(ks))
    assert ks != [len(Schedule("nested", (30, 28, 26), 200, seed=4).skip(s)) for s in range(200)]
    with pytest.raises(UserError, match="unknown schedule"):
        Schedule("random", (1,), 1)


def test_step_flops_count_shared_prefix():
    cfg = Phi3Config.from_dict(CFG)
    full = step_flops_per_token(cfg, 16, ())
    late = step_flops_per_token(cfg, 16, (4,))
    early = step_flops_per_token(cfg, 16, (0,))
    assert full < late < early  # skipping late layers re-runs only the last block in the small pass
    params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # embedding lookups are free
    assert 8 * params < full < 9 * params  # 2N teacher + 6N student, plus attention


def test_perplexity_is_exp_mean_cross_entropy():
    model = tiny()
    win = tokens(3, 17, seed=5)
    x, y = win[:, :-1], win[:, 1:]
    with torch.no_grad():
        ce = F.cross_entropy(model(x, skip=(2,)).flatten(0, 1), y.flatten())
    assert perplexity(model, win, skip=(2,)) == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert perplexity(model, [(x[:2], y[:2]), (x[2:], y[2:])], skip=(2,), chunk=4) == pytest.approx(
        math.exp(ce.item()), rel=1e-5)
    nll, n = token_nll(model, x, y, (2,), chunk=7)
    assert n == y.numel() and nll.item() == pytest.approx(ce.item() * n, rel=1e-5)
