"""A training run's settings, typed (torchtitan's JobConfig): train.py parses its flags into one `JobConfig` once,
and the Trainer and every helper read that. `resolved` fills the defaults that depend on the schedule (the
recipe), `check` applies the rules that need no model, `check_model` those that need its config, and
`run_settings` is what a checkpoint records of the run (a resume must match it).

    job = JobConfig(data=("data/stdlib",), schedule="nested", max_steps=72).resolved()
    job.check()
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import machine
from ..core.cli import Range, UserError, check_ranges
from ..core.devices import parse_dtype
from ..data.tokens import Mixture, blend_pattern, data_fingerprint
from ..model.config import Phi3Config
from ..model.skipsets import SHORTLIST, parse_layers
from .distill import K_DISTS, SCHEDULES
from .train_state import RunSettings

# Upper bounds: what a machine can honour. A run of more steps than MAX_STEPS (a billion) would never end, a token
# count above MAX_TOKENS (2**40, terabytes of token files) is more than any data holds; what a count would allocate
# (batch x sequence x vocabulary logits, the least-squares fit's residuals) is checked against the machine's memory by
# `check_memory` before anything is allocated.
MAX_STEPS, MAX_TOKENS = 10**9, 2**40
SEED = machine.SEED  # below 2**32: numpy's legacy seeding takes no more, so a recorded seed reproduces anywhere
STEPS = Range(1, MAX_STEPS, note="a billion steps")
STEPS_OR_0 = Range(0, MAX_STEPS, note="a billion steps")
TOKENS = Range(1, MAX_TOKENS, note="2**40 tokens")
TOKENS_OR_0 = Range(0, MAX_TOKENS, note="2**40 tokens")
WEIGHT = Range(0, 1e6, note="a loss weight")
# Every numeric flag's range, checked before any work; bounds that depend on the model (--adapter-rank, --adapter-mlp,
# --depth-rank, --num-skip, --max-seq-len) are checked by `JobConfig.check_model` as soon as its
# config is read, and the memory that --batch-size, --max-seq-len and the token counts need by `check_memory`.
NUMBERS = {
    **dict.fromkeys(("--max-steps", "--steps-per-layer", "--stop-at", "--log-every"), STEPS),
    **dict.fromkeys(("--save-every", "--eval-every", "--warmup"), STEPS_OR_0),
    **dict.fromkeys(("--eval-tokens", "--rank-tokens"), TOKENS),
    **dict.fromkeys(("--lsq-tokens", "--lsq-check-tokens"), TOKENS_OR_0),
    **dict.fromkeys(("--kd-weight", "--ce-weight", "--align-weight"), WEIGHT),
    "--batch-size": Range(1, 2**31 - 1, note="then the memory check"),
    "--max-seq-len": Range(1, 2**31 - 1, note="then the model's positions"),
    "--kl-chunk": Range(1, 2**31 - 1, note="tokens per chunk"),
    "--grad-accum": Range(1, 2**20, note="micro-batches per step"),
    "--keep-checkpoints": Range(1, 10**4, note="checkpoints kept on disk"),
    "--num-skip": Range(1, 2**16, note="then the model's layers"),
    "--adapter-rank": Range(0, 2**20, note="then the model's hidden size"),
    "--adapter-mlp": Range(0, 2**24, note="then the model's MLP width"),
    "--depth-rank": Range(0, 2**20, note="then the model's hidden size"),
    "--rank-shortlist": Range(0, 2**16, note="layers; more than the model has: all of them"),
    "--seed": SEED,
    "--lr": Range(0, 10.0, above=True, note="a rate above 10 diverges at once"),
    "--temperature": Range(0, 100.0, above=True, note="the distillation temperature"),
    "--num-epochs": Range(0, 1e6, above=True, note="passes over the data"),
    "--data-weights": Range(0, 1e12, above=True, note="a blend's weight"),
    "--weight-decay": Range(0, 10.0, note="AdamW's decoupled decay"),
    "--grad-clip": Range(0, 1e6, note="the gradient norm's cap; 0: none"),
    "--min-lr-ratio": Range(0.0, 1.0),
}


def machine_memory(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(bytes, where): a GPU's memory, or this machine's (MemTotal in /proc/meminfo, else the physical pages)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"GPU memory ({device})"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return kib * 1024, "memory (/proc/meminfo)"
    except (OSError, StopIteration, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "memory"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


@dataclass(frozen=True)
class JobConfig:
    """Every setting of a train.py run; the fields are its flags (`--max-seq-len` is `max_seq_len`), with their
    defaults. None marks a default that `resolved` decides from the schedule."""
    data: tuple[str, ...] = ()  # folders made by prepare.py; several are blended
    model: str = "microsoft/Phi-3-mini-4k-instruct"
    data_weights: tuple[float, ...] | None = None
    out: str = "data/llm_cache/student_model"
    overwrite: bool = False
    layers: str | None = None  # "30,28,26", or "auto" (the greedy order); None: L-2, L-4, ...
    num_skip: int | None = None
    rank_tokens: int = 1024
    rank_shortlist: int = SHORTLIST
    schedule: str = "sequential"
    train_scope: str | None = None
    k_dist: str | None = None
    adapter_rank: int | None = None
    adapter_mlp: int | None = None
    depth_rank: int = 0
    lsq_tokens: int = 16384
    lsq_check_tokens: int = 2048
    lr: float | None = None
    num_epochs: float = 1.0
    steps_per_layer: int | None = None
    max_steps: int | None = None
    max_seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    temperature: float = 1.0
    kd_weight: float | None = None
    ce_weight: float = 0.0
    align_weight: float | None = None
    warmup: int | None = None
    min_lr_ratio: float | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_tokens: int = 131072
    save_every: int = 500
    keep_checkpoints: int = 2
    ckpt_dir: str | None = None
    resume: bool = False
    stop_at: int | None = None
    compile: bool = False
    activation_checkpointing: bool = False
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    log_dir: str = "data/logs"
    log_every: int = 10
    kl_chunk: int | None = None

    @property
    def adapters(self) -> bool:
        """--train-scope adapters: the base stays frozen (it is the teacher) and only the bypasses train."""
        return (self.train_scope or "").strip().lower() == "adapters"

    @property
    def checkpoints(self) -> Path:
        """--ckpt-dir, by default data/checkpoints/<--out's name>."""
        return Path(self.ckpt_dir or Path("data/checkpoints") / Path(self.out).name)

    def resolved(self) -> JobConfig:
        """Defaults that depend on the schedule. nested: the frozen base with least-squares bypasses, sandwich k,
        a constant lr 1e-3 (the best recipe measured, docs/quality.md); sequential: the seed's recipe, every block
        trains."""
        nested = self.schedule == "nested"
        scope = self.train_scope if self.train_scope is not None else "adapters" if nested else "all"
        job = dataclasses.replace(self, train_scope=scope,
                                  k_dist=self.k_dist if self.k_dist is not None else
                                  "sandwich" if nested else "uniform")
        adapters = job.adapters
        return dataclasses.replace(
            job, lr=self.lr if self.lr is not None else 1e-3 if adapters else 1e-5,
            # adapters: a constant rate (row 20261129-030936 against 20261128-223336)
            min_lr_ratio=self.min_lr_ratio if self.min_lr_ratio is not None else 1.0 if adapters else 0.1,
            warmup=0 if self.warmup is None and adapters else self.warmup)

    def check(self) -> None:
        """The rules that need no model, each broken one a one-line UserError (call on a `resolved` config)."""
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule!r}: unknown; use one of {', '.join(SCHEDULES)}")
        check_ranges(self, NUMBERS)
        if not self.data:
            raise UserError("--data: give at least one folder made by prepare.py")
        real = [os.path.realpath(d) for d in self.data]  # symlinks, ./A, A/ and other spellings of one folder
        for i, r in enumerate(real):
            if (j := real.index(r)) < i:
                raise UserError(f"--data names one folder twice: {self.data[j]} and {self.data[i]} are both {r}; name "
                                f"each folder once (to weigh one more, use --data-weights)")
        if self.data_weights is not None and len(self.data_weights) != len(self.data):
            raise UserError(f"--data-weights: {len(self.data_weights)} weight(s) for {len(self.data)} --data "
                            f"folder(s); give one per folder")
        if self.k_dist not in K_DISTS:
            raise UserError(f"--k-dist {self.k_dist!r}: unknown; use one of {', '.join(K_DISTS)}")
        if self.adapters and self.ce_weight:
            raise UserError("--ce-weight: with --train-scope adapters the full model is the frozen teacher; drop it")
        if self.align_weight and not self.adapters:
            raise UserError("--align-weight aligns the bypasses of --train-scope adapters; drop it or train adapters")
        if self.adapter_rank == 0 and self.adapter_mlp == 0:
            raise UserError("--adapter-rank 0 --adapter-mlp 0: the bypasses would run nothing; give one of them")
        if self.depth_rank and not self.adapters:
            raise UserError("--depth-rank gives the bypasses of --train-scope adapters per-depth deltas; drop it or "
                            "train adapters")
        if self.dtype is not None and parse_dtype(self.dtype) not in (torch.bfloat16, torch.float32):
            raise UserError(f"--dtype {self.dtype}: training runs in bfloat16 or float32 (float16 would need a loss "
                            f"scaler, and its gradients underflow without one)")

    def check_model(self, config: Phi3Config) -> None:
        """The ranges that depend on the model, checked on every rank before any weights load (under torchrun a
        rank that failed alone later would leave the others waiting in a collective)."""
        L = config.num_hidden_layers
        candidates = L if self.layers == "auto" else len(parse_layers(self.layers, L))
        check_ranges(self, {"--max-seq-len": Range(1, config.max_position_embeddings, note="the model's positions"),
                            "--adapter-rank": Range(0, config.hidden_size, note="the model's hidden size"),
                            "--adapter-mlp": Range(0, config.intermediate_size, note="the model's MLP width"),
                            "--depth-rank": Range(0, config.hidden_size, note="the model's hidden size"),
                            "--num-skip": Range(1, candidates, note="the number of candidate layers")})

    @property
    def blend_weights(self) -> tuple[float, ...] | None:
        """A blend's weights exactly as given (equal ones by default); None for one folder."""
        return None if len(self.data) == 1 else tuple(self.data_weights or [1.0] * len(self.data))

    def memory_needed(self, config: Phi3Config) -> dict[str, tuple[int, str]]:
        """Lower bounds of the run's largest buffers, in bytes, each with the flags that size it: the student's fp32
        weights, the student's and teacher's fp32 logits of one micro-batch, the least-squares fit's fp32 residuals
        (every layer's, for --lsq-tokens + --lsq-check-tokens tokens) and the token ids it samples."""
        B, T, V = self.batch_size, self.max_seq_len, config.vocab_size
        H, L = config.hidden_size, config.num_hidden_layers
        lsq = (self.lsq_tokens + self.lsq_check_tokens) if self.adapters else 0
        rank = self.rank_tokens if self.layers == "auto" else 0
        return {"weights": (config.num_params() * 4, "--model"),
                "logits": (2 * B * T * V * 4, f"--batch-size {B} x --max-seq-len {T}"),
                "least-squares residuals": (self.lsq_tokens * (L + 1) * H * 4 if self.adapters else 0,
                                            f"--lsq-tokens {self.lsq_tokens}"),
                "token ids": ((rank + lsq) * 8, f"--rank-tokens {self.rank_tokens}")}

    def check_memory(self, config: Phi3Config, device: torch.device | str = "cpu") -> None:
        """Refuse, before anything is allocated, a run whose buffers alone exceed the machine's memory: one line
        with the estimate, its largest part and the flags that size it."""
        need = self.memory_needed(config)
        total = sum(n for n, _ in need.values())
        have, where = machine_memory(device)
        if total > have:
            part, (n, flags) = max(need.items(), key=lambda kv: kv[1][0])
            raise UserError(f"{flags}: the run needs at least {_gib(total)} ({part} {_gib(n)}), more than this "
                            f"machine's {_gib(have)} of {where}; lower it")

    def data_setting(self) -> str:
        """The training data as the run's settings hold it: one folder as its real path (as runs always recorded
        it), a blend as each folder with its weight as given (repr: every digit)."""
        paths = [os.path.realpath(f) for f in self.data]
        if self.blend_weights is None:
            return paths[0]
        return " + ".join(f"{w!r} x {p}" for p, w in zip(paths, self.blend_weights))

    def data_identity(self) -> dict:
        """The data a checkpoint is valid for: each folder's real path with the fingerprint of its tokens (from its
        meta.json; hashed now for a folder prepared before prepare.py kept one), a blend's exact weights and the
        interleaving pattern they give."""
        weights = self.blend_weights
        return dict(data_files=tuple(f"{os.path.realpath(f)} {data_fingerprint(f)}" for f in self.data),
                    data_weights=weights,
                    blend_pattern=None if weights is None else
                    ",".join(map(str, blend_pattern(weights, Mixture.PERIOD).tolist())))

    def run_settings(self, *, layers: tuple[int, ...], steps_per_phase: int, world_size: int, warmup: int,
                     kd_weight: float) -> RunSettings:
        """What a checkpoint records of this run, the plan's numbers included; a resume must match it."""
        return RunSettings(model=str(self.model), data=self.data_setting(), layers=layers, schedule=self.schedule,
                           lr=self.lr, steps_per_phase=steps_per_phase,
                           global_batch=self.batch_size * world_size * self.grad_accum, max_seq_len=self.max_seq_len,
                           grad_accum=self.grad_accum, temperature=self.temperature, kd_weight=kd_weight,
                           ce_weight=self.ce_weight, train_scope=self.train_scope, warmup=warmup,
                           min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           seed=self.seed, k_dist=self.k_dist, adapter_rank=self.adapter_rank,
                           adapter_mlp=self.adapter_mlp, lsq_tokens=self.lsq_tokens,
                           align_weight=self.align_weight or None, depth_rank=self.depth_rank or None,
                           **self.data_identity())
