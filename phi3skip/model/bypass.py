"""Skip adapters: a small bypass that runs in the slot of a skipped layer, over a frozen base model.

With a frozen base the full path *is* the teacher, bit for bit; only skipped inference changes. When layer l
is skipped, instead of nothing the slot runs a small block: a rank-r linear map of the normalised residual stream
in place of attention (no KV cache), then a narrow SwiGLU MLP (m channels, started as the m most active channels
of the skipped block's own MLP):

    h  <-  x + up_l(down_l(rmsnorm_l(x)))      down_l: H -> r,  up_l: r -> H
    x  <-  h + mlp_l(rmsnorm'_l(h))

(2 r + 3 m) H multiply-adds per token, about 8% of a block at the default sizes: at six skipped layers of 30 the
bypasses read ~1% of a token's weight bytes, so skipping stays nearly as fast as the plain skip. The bypass of a
layer is shared by every skip set: every subset of the trained layers has its bypasses. Initialised on
calibration activations (ReplaceMe's idea: the linear map that best replaces the block, by least squares, here
fitted to what the kept MLP channels leave), then trained by distillation (`train.py --train-scope adapters`).

Per-depth deltas (`depth_rank` q > 0, `train.py --depth-rank`): a bypass shared by every depth is a compromise
(trained at its own depth alone, the first layer's reached a perplexity ratio ~1.01 at k = 1 where the shared one
got ~1.035). So the bypass of the layer at position p of the trained order also has, for each depth k in
p+1..K (the skip set order[:k]), a LoRA-style correction B A of rank q (`LowRank`: B zero, so a fresh delta
changes nothing and the least-squares start is every depth's start) on each of its weights: down, up and,
with an MLP, its gate_up_proj and down_proj. A skip set runs at depth k = 1 + the last position in the order of
its bypassed layers (`SkipAdapters.depth`): a trained prefix at its own depth, any other set at that of the
smallest prefix containing it, whose bypasses were trained with those layers skipped. Its weights are then
W + B_k A_k; `merged` folds them into plain bypasses (exactly what runs), which is what leaves phi3skip (the
deci export) and what a Generator decodes with. At SmolLM2's sizes (H 576, rank 64, 128 MLP channels) q = 8
adds 22,528 parameters per (layer, depth), 811,008 for 8 layers (36 pairs): 34% more than the bypasses' 2.37M,
none of them run at inference once merged.

On disk: `skip_adapters.safetensors` beside the base checkpoint, named by skip.json's "adapters" entry, so the
folder stays a plain `Phi3ForCausalLM` checkpoint that transformers loads as is (without the adapters). A skip
set with bypasses exports as a heterogeneous-block model (phi3skip.formats.deci: llama.cpp's `deci` architecture, whose
"linear attention" block is exactly this map followed by an FFN); a standard Phi-3 checkpoint cannot hold it.
"""
from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from ..core.cli import UserError
from .cost import block_weights
from .skipsets import FORMS, KIND
from .model import MLP, Phi3ForCausalLM, RMSNorm, swiglu

FILE = "skip_adapters.safetensors"
DELTA_SEED = 0  # fresh deltas' A factors come from this seed: a fresh student is reproducible


class LowRank(nn.Module):
    """A rank-q correction B A of an [out, in] weight: LoRA's factors, without a separate scale. B starts at zero,
    so the correction adds nothing. A is uniform with an RMS of 1/sqrt(q): under Adam each entry of B moves ~lr a
    step, and so then does each entry of B A, as the bypass's own weights do. LoRA's default A (uniform in
    +-1/sqrt(in), RMS 1/sqrt(3 in)) made the corrections ~15x slower at SmolLM2's sizes: after the demo's 72 steps
    they had moved 0.05-3.5% of their weights' norm and changed no ratio (docs/quality.md, row 20261205-020057)."""

    def __init__(self, out: int, inp: int, q: int, generator: torch.Generator):
        super().__init__()
        a = torch.rand(q, inp, generator=generator, device="cpu", dtype=torch.float32)
        self.A = nn.Parameter((2 * a - 1) * math.sqrt(3 / q))
        self.B = nn.Parameter(torch.zeros(out, q))

    def delta(self) -> torch.Tensor:
        return self.B @ self.A


class Bypass(nn.Module):
    """What runs in a skipped layer's slot: a block whose attention is a rank-r linear map and whose MLP is narrow.

    rank 0: no map at all, an attention-dropped slot: out = x + mlp(mlp_norm(x)), its block's FFN (at full width, the
    block's own channels to start) kept and trained, its attention and KV cache gone. It exports as a Nemotron-NAS
    block with `no_op` attention, which vLLM and SGLang serve too.

    sequential (default): h = x + up(down(norm(x))); out = h + mlp(mlp_norm(h)), the shape of a decoder block, so
    an exported slot is a block of llama.cpp's `deci` architecture (linear attention + FFN) computing exactly this.
    parallel (students saved before that form, 2026-12): out = x + up(down(norm(x))) + mlp(mlp_norm(x)).

    With `depth_rank` q > 0 it holds, for each of `depths`, a `LowRank` correction of every weight (`depth[str(k)]`,
    named as the weights: down, up, mlp.gate_up_proj, mlp.down_proj); `forward(x, depth=k)` runs W + B_k A_k.
    """

    def __init__(self, hidden: int, rank: int, eps: float, mlp: int = 0, form: str = "sequential",
                 depths: Iterable[int] = (), depth_rank: int = 0, generator: torch.Generator | None = None):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"bypass form {form!r}: one of {', '.join(FORMS)}")
        if not rank and not mlp:
            raise ValueError("a bypass needs a linear map (rank > 0) or MLP channels, or both")
        self.form, self.hidden = form, hidden
        self.norm = RMSNorm(hidden, eps) if rank else None
        self.down = nn.Linear(hidden, rank, bias=False) if rank else None
        self.up = nn.Linear(rank, hidden, bias=False) if rank else None
        if rank:
            nn.init.zeros_(self.up.weight)  # a fresh bypass adds nothing: skipping it is the naive skip
        self.mlp_norm = RMSNorm(hidden, eps) if mlp else None
        self.mlp = MLP(hidden, mlp) if mlp else None
        if mlp:
            nn.init.zeros_(self.mlp.down_proj.weight)
        self.depth = nn.ModuleDict()
        if depth_rank:
            g = generator if generator is not None else torch.Generator().manual_seed(DELTA_SEED)
            self.depth.update({str(k): self._deltas(depth_rank, g) for k in depths})

    def linears(self) -> dict[str, nn.Linear]:
        """The bypass's weights by name: the map's two when it has one, then the MLP's two when it has one."""
        out = {} if self.down is None else {"down": self.down, "up": self.up}
        if self.mlp is not None:
            out.update({"mlp.gate_up_proj": self.mlp.gate_up_proj, "mlp.down_proj": self.mlp.down_proj})
        return out

    def _deltas(self, q: int, g: torch.Generator) -> nn.ModuleDict:
        """One depth's corrections, a tree named as the weights (`linears`)."""
        lr = lambda w: LowRank(*w.weight.shape, q, g)  # noqa: E731
        tree = nn.ModuleDict({} if self.down is None else {"down": lr(self.down), "up": lr(self.up)})
        if self.mlp is not None:
            tree["mlp"] = nn.ModuleDict({"gate_up_proj": lr(self.mlp.gate_up_proj),
                                         "down_proj": lr(self.mlp.down_proj)})
        return tree

    def weights(self, depth: int | None = None) -> dict[str, torch.Tensor]:
        """The weights the bypass runs with at `depth` (names as `linears`): its own, plus that depth's correction
        when it has per-depth deltas (None: its own)."""
        own = {name: lin.weight for name, lin in self.linears().items()}
        if depth is None or not len(self.depth):
            return own
        d = self.depth[str(depth)]
        return {name: w + d.get_submodule(name).delta() for name, w in own.items()}

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        if depth is None or not len(self.depth):  # its own weights, through its modules (they may be quantized)
            h = x if self.down is None else x + self.up(self.down(self.norm(x)))
            return h if self.mlp is None else h + self.mlp(self.mlp_norm(h if self.form == "sequential" else x))
        w = self.weights(depth)
        h = x if self.down is None else x + F.linear(F.linear(self.norm(x), w["down"]), w["up"])
        if self.mlp is None:
            return h
        return h + swiglu(self.mlp_norm(h if self.form == "sequential" else x), w["mlp.gate_up_proj"],
                          w["mlp.down_proj"])

    @torch.no_grad()
    def merged(self, depth: int | None) -> Bypass:
        """A plain bypass (no deltas, no gradient) computing what this one does at `depth`: its weights are
        `weights(depth)`, the very sums the forward makes, so the two agree bit for bit."""
        r = 0 if self.down is None else self.down.weight.shape[0]
        m = 0 if self.mlp is None else self.mlp.down_proj.weight.shape[1]
        eps = (self.norm if self.norm is not None else self.mlp_norm).eps
        with torch.device("meta"):
            out = Bypass(self.hidden, r, eps, m, self.form)
        own = {k: v.clone() for k, v in self.state_dict().items() if not k.startswith("depth.")}
        own.update({f"{name}.weight": w.clone() for name, w in self.weights(depth).items()})
        out.load_state_dict(own, assign=True)
        return out.requires_grad_(False)


class SkipAdapters(nn.Module):
    """One bypass per trainable layer (with `depth_rank`, per-depth deltas for the depths it serves: the layer
    at position p of `layers` for k in p+1..len(layers)); `for_skip` gives the model's block loop those of a
    skip set."""

    def __init__(self, layers: Sequence[int], hidden: int, rank: int, eps: float, mlp: int = 0,
                 form: str = "sequential", depth_rank: int = 0):
        super().__init__()
        self.layers = tuple(int(i) for i in layers)
        self.rank, self.mlp, self.form, self.depth_rank = rank, mlp, form, depth_rank
        g, K = torch.Generator().manual_seed(DELTA_SEED), len(self.layers)
        self.bypass = nn.ModuleDict({str(i): Bypass(hidden, rank, eps, mlp, form, range(p + 1, K + 1), depth_rank, g)
                                     for p, i in enumerate(self.layers)})

    def depth(self, skipped: Iterable[int]) -> int:
        """The depth a skip set's bypasses run at: the length of the smallest trained prefix of `layers` that
        holds every layer of the set with a bypass (0: none). A prefix runs at its own depth; another set at that
        of the smallest prefix containing it, the set its bypasses were trained in that is closest to it."""
        return max([0] + [self.layers.index(i) + 1 for i in skipped if i in self])  # no default=: torch.compile

    def variant(self, skipped: Iterable[int]) -> int:
        """What tells two skip sets' bypasses apart: their depth with per-depth deltas; 0 (all shared) without."""
        return self.depth(skipped) if self.depth_rank else 0

    def for_skip(self, skipped: Iterable[int]) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """{layer: its bypass} for the set's layers that have one, run at the set's depth (`variant`)."""
        skipped = [i for i in skipped if i in self]
        k = self.variant(skipped)
        return {i: partial(self.bypass[str(i)], depth=k) if k else self.bypass[str(i)] for i in skipped}

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.bypass

    def describe(self) -> dict:
        return {"file": FILE, "kind": KIND, "rank": self.rank, "mlp": self.mlp, "form": self.form,
                "depth_rank": self.depth_rank, "layers": list(self.layers)}


def merged(adapters: SkipAdapters, skipped: Iterable[int]) -> dict[int, Bypass]:
    """A skip set's bypasses as plain `Bypass`es, its depth's deltas folded in (W + B_k A_k: exactly what
    `for_skip` runs); without deltas, the adapters' own. What a skip set takes out of phi3skip."""
    skipped = [i for i in skipped if i in adapters]
    k = adapters.variant(skipped)
    return {i: adapters.bypass[str(i)].merged(k) if k else adapters.bypass[str(i)] for i in skipped}


# A bypass's multiply-adds as a fraction of a block's. On the demo's budget a rank-256 map (8%) cut the excess
# perplexity over the teacher by 15-25% at every depth against rank 64 (2%), for 5% more training time
# (docs/quality.md, runs 200730 and 223336). Within that 8%, MLP channels copied from the skipped block buy more
# than linear rank: 128 channels + rank 64 against rank 256 cut the excess at six skipped layers by 12% (run
# 042328 against 030936; a tie at one or two), best of the splits tried by least squares alone.
SLOT_COST = 0.08
MLP_SHARE = 0.75


def default_sizes(config) -> tuple[int, int]:
    """(rank, MLP channels), multiples of 64, whose (2 r + 3 m) H multiply-adds are about SLOT_COST of a block's,
    MLP_SHARE of it in MLP channels: (64, 128) for SmolLM2-135M, (320, 768) for Phi-3-mini."""
    budget = SLOT_COST * block_weights(config) / config.hidden_size  # in multiply-adds per residual dimension
    mlp = min(config.intermediate_size, round(MLP_SHARE * budget / 3 / 64) * 64)
    return max(8, round((budget - 3 * mlp) / 2 / 64) * 64), mlp


def default_mlp(config, rank: int) -> int:
    """The MLP channels a bypass of `rank` gets unless told: `default_sizes`' for a map, the block's whole MLP for an
    attention-dropped slot (rank 0), which keeps its FFN."""
    return config.intermediate_size if rank == 0 else default_sizes(config)[1]


def attach(model: Phi3ForCausalLM, layers: Sequence[int], rank: int | None = None, mlp: int | None = None,
           form: str = "sequential", depth_rank: int = 0) -> SkipAdapters:
    """Give `model` fresh (zero) bypasses for `layers`, their norms copied from the skipped blocks' two norms, and
    with `depth_rank` q > 0 fresh (zero) rank-q deltas for each depth (`SkipAdapters`)."""
    cfg = model.config
    d_rank = default_sizes(cfg)[0]
    rank = d_rank if rank is None else rank
    mlp = default_mlp(cfg, rank) if mlp is None else mlp
    if not 0 <= rank <= cfg.hidden_size:
        raise UserError(f"bypass rank {rank}: must be 0 (no map) .. the model's hidden size {cfg.hidden_size}")
    if not rank and not mlp:
        raise UserError("bypass rank 0 and no MLP channels: it would run nothing; give a rank, MLP channels or both")
    if not 0 <= mlp <= cfg.intermediate_size:
        raise UserError(f"bypass MLP width {mlp}: must be 0 .. the model's intermediate size {cfg.intermediate_size}")
    if not 0 <= depth_rank <= cfg.hidden_size:
        raise UserError(f"per-depth delta rank {depth_rank}: must be 0 .. the model's hidden size {cfg.hidden_size}")
    p = model.model.norm.weight  # the model's dtype and device (the lm_head's weight may be quantized)
    adapters = SkipAdapters(layers, cfg.hidden_size, rank, cfg.rms_norm_eps, mlp, form, depth_rank).to(
        device=p.device, dtype=p.dtype)
    with torch.no_grad():
        for i in adapters.layers:
            byp, block = adapters.bypass[str(i)], model.model.layers[i]
            if rank:
                byp.norm.weight.copy_(block.input_layernorm.weight)
            if mlp:
                byp.mlp_norm.weight.copy_(block.post_attention_layernorm.weight)
    model.skip_adapters = adapters
    return adapters


# Saving and loading -----------------------------------------------------------------------------------------
def state_dict(adapters: SkipAdapters) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.{k}": v.detach().contiguous() for i in adapters.layers
            for k, v in adapters.bypass[str(i)].state_dict().items()}


def file_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    """skip_adapters.safetensors' contents, in fp32: the adapters are small, their updates are not."""
    sd = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in sd.items()}
    return save(sd, metadata={"format": "pt", "kind": KIND})


def to_bytes(adapters: SkipAdapters) -> bytes:
    return file_bytes(state_dict(adapters))


def split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model's state dict -> (the plain Phi-3 part, the adapters under their file's names)."""
    prefix = "skip_adapters.bypass."
    base = {k: v for k, v in sd.items() if not k.startswith("skip_adapters.")}
    adapters = {"layers." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return base, adapters


def set_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze the base; the skip adapters train. Returns the trainable parameters."""
    out = []
    for name, p in model.named_parameters():
        train = "skip_adapters." in name
        p.requires_grad_(train)
        if train:
            out.append(p)
    return out


def load(model: Phi3ForCausalLM, folder: str | Path, entry: dict) -> SkipAdapters:
    """Attach the adapters that skip.json's `entry` names (safetensors only: nothing loaded can run code)."""
    folder = Path(folder)
    try:
        kind, rank, layers = entry["kind"], int(entry["rank"]), [int(i) for i in entry["layers"]]
        mlp = int(entry.get("mlp", 0))  # written by phi3skip before the bypass had an MLP: none
        depth_rank = int(entry.get("depth_rank", 0))  # written before per-depth deltas: none
        form = str(entry.get("form", "parallel"))  # written before the sequential form: parallel
        name = str(entry.get("file", FILE))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{folder}/skip.json: its 'adapters' entry is malformed ({json.dumps(entry)[:120]})") from None
    if form not in FORMS:
        raise UserError(f"{folder}/skip.json: unknown bypass form {form!r} (this phi3skip knows {', '.join(FORMS)})")
    if kind != KIND:
        raise UserError(f"{folder}/skip.json: unknown skip-adapter kind {kind!r} (this phi3skip knows {KIND!r})")
    path = folder / Path(name).name
    if not path.is_file():
        raise UserError(f"{folder}/skip.json names skip adapters {path.name}, which is missing")
    n = model.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise UserError(f"{path}: adapter layers {layers} are not layers of this {n}-layer model")
    try:
        adapters = attach(model, layers, rank, mlp, form, depth_rank)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    want = state_dict(adapters)
    try:
        with safe_open(str(path), framework="pt") as f:
            got = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    if set(got) != set(want) or any(got[k].shape != want[k].shape for k in want):
        raise UserError(f"{path}: its tensors do not match the adapters skip.json describes (rank {rank}, "
                        f"MLP width {mlp}, depth rank {depth_rank}, layers {layers}); re-save the student")
    with torch.no_grad():
        for k, v in want.items():
            v.copy_(got[k])
    return adapters
