"""Lossless self-speculative decoding: the same weights with more layers skipped draft `lookahead` tokens one at
a time, and the model with `skip` checks them all in one forward (gpt-fast's speculative_decode, with the draft
being the model itself). Greedy output equals plain greedy output token for token; sampled output follows the
verifier's distribution (`accept_drafts`). Layers below the first layer that only the draft skips compute the
same keys and values in both models, so the draft borrows the verifier's cache for them (generate.py's
workspace). One prompt at a time; design notes in docs/generation.md.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .sampling import Sampling, draw, sample
from .stream import GenerationResult, TokenStream


def accept_drafts(drafts: torch.Tensor, draft_probs: torch.Tensor | None, target: torch.Tensor,
                  greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative acceptance for M independent rounds, on the device, no host synchronisation.

    drafts [M, K] drafted tokens; draft_probs [M, K, V] their distributions q (None when greedy);
    target [M, K+1, V] the verifier's logits (greedy) or probabilities p (sampling) at the K+1 positions.
    Returns (accepted [M], next [M]): how many drafts are kept, and the token that follows them (the
    verifier's correction at the first rejection, or its bonus token when all K are kept).
    """
    M, K = drafts.shape
    if greedy:
        best = target.argmax(-1)
        n = (drafts == best[:, :K]).long().cumprod(-1).sum(-1)
        return n, best.gather(-1, n[:, None])[:, 0]
    assert draft_probs is not None
    p_d = target[:, :K].gather(-1, drafts[..., None])[..., 0]
    q_d = draft_probs.gather(-1, drafts[..., None])[..., 0]
    keep = torch.rand_like(p_d) * q_d <= p_d  # u <= p(x) / q(x)
    n = keep.long().cumprod(-1).sum(-1)
    q_ext = torch.cat([draft_probs, torch.zeros_like(target[:, :1])], 1)  # q = 0 at the bonus position
    idx = n[:, None, None].expand(M, 1, target.shape[-1])
    p_n, q_n = target.gather(1, idx)[:, 0], q_ext.gather(1, idx)[:, 0]
    residual = (p_n - q_n).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q: never rejected
    return n, draw(residual)


def speculative_decode(gen, prompt: list[int], N: int, s: Sampling, stop: set[int],
                       on_tokens: Callable | None, seed: int | None) -> GenerationResult:
    """Up to N tokens after `prompt` with the Generator `gen`'s draft skip set drafting and its skip set verifying
    (its workspace and steps: generate.py, which calls this)."""
    P, K = len(prompt), gen.lookahead
    ws = gen.workspace(1, P + N + K, False)  # drafts may run K - 1 slots past the last kept token
    ws.seq[0, :P].copy_(torch.tensor(prompt))
    long, longs = gen.rope_sets(P, P + N - 2)
    compile_s = gen.warm(ws, [("decode", 1), ("draft", 1), ("draft", 2), ("verify", K + 1)], longs, s)
    if seed is not None:
        torch.manual_seed(seed)
    stream = TokenStream(1, P, stop, on_tokens)
    V = gen.model.config.vocab_size
    q_buf = None if s.greedy else torch.zeros(1, K, V, device=gen.device)
    d_buf = torch.zeros(1, K, dtype=torch.long, device=gen.device)
    ar = torch.arange(K + 1, device=gen.device)
    t0 = time.perf_counter()
    tok, _ = sample(gen.prefill(ws, P, long), s)
    ws.seq[0, P].copy_(tok[0])
    gen.prefill(ws, P, long, kind="draft")
    draft_len = P  # slots the draft cache holds (the verifier's always runs up to the token fed next)
    stream.flush(ws.seq, 1)
    t1 = time.perf_counter()
    g, drafted, accepted, reprefills = 1, 0, 0, 0
    while g < N and not stream.all_done:
        n = P + g  # tokens so far; the last one, at slot n - 1, is in neither cache yet
        # Always K drafts (tokens past N are dropped): one step shape, so one compiled graph.
        k = K
        if gen.crosses_original(n - 1, long):  # both caches re-prefilled with the long factors
            long = True
            tok = gen.reprefill_long(ws, n, s)
            draft_len, reprefills = n, reprefills + 1
            ws.seq[0, n].copy_(tok[0])
            g += 1
            stream.flush(ws.seq, g)
            continue
        if gen.has_long and not long:
            k = min(k, gen.original_max - n)  # no round may reach the crossing slot
        if k <= 0:  # next to the crossing: one plain verifier step (the draft cache is re-prefilled next)
            tok = gen.decode_one_token(ws, n - 1, long, s)
            ws.seq[0, n].copy_(tok[0])
            g += 1
            stream.flush(ws.seq, g)
            continue
        # Draft k tokens; its first step also feeds tokens the draft cache lacks (slots draft_len..n-1).
        for j in range(k):
            start = draft_len if j == 0 else n - 1 + j
            T = n + j - start
            if T in (1, 2):
                d, q = gen.step(ws, "draft", start, T, long, s)
            else:  # rare (after plain steps): an eager catch-up forward
                d, q = gen.eager_step(ws, "draft", start, T, long, s)
            d_buf[:, j].copy_(d)
            if q_buf is not None:
                q_buf[:, j].copy_(q)
            ws.seq[0, n + j].copy_(d[0])
        draft_len = n + k - 1
        (target,) = gen.step(ws, "verify", n - 1, k + 1, long, s)
        n_acc, nxt = accept_drafts(d_buf[:, :k], None if q_buf is None else q_buf[:, :k], target, s.greedy)
        # Slots n.. get the kept drafts then the next token (later slots are overwritten before use).
        ws.seq[0, n:n + k + 1].copy_(torch.where(ar[:k + 1] < n_acc, ws.seq[0, n:n + k + 1], nxt))
        a = int(n_acc)  # the one host synchronisation per round
        drafted += k
        accepted += a
        draft_len = min(draft_len, n + a)  # the draft cache is valid up to the last kept draft
        g += a + 1
        stream.flush(ws.seq, min(g, N))
    g = min(g, N)
    stream.flush(ws.seq, g)
    t2 = time.perf_counter()
    return GenerationResult(stream.tokens, stream.finish, P, t1 - t0, t2 - t1, compile_s, len(gen.layers),
                            gen.num_layers, gen.skip, draft_skip=gen.draft_skip,
                            draft_layers_run=len(gen.draft_layers), lookahead=K, drafted=drafted,
                            accepted=accepted, reprefills=reprefills)
