"""Distil a Phi-3 model into a student whose chosen layers can be skipped at inference.

    python train.py --data data/NAME                                   # one process: CPU or one GPU
    torchrun --nproc_per_node 8 train.py --model microsoft/Phi-3-mini-4k-instruct --data data/NAME
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN \\
        train.py --data data/NAME                                      # several nodes (shared --ckpt-dir)

The settings are a typed JobConfig (phi3skip/train/job.py), parsed once from the flags. The loss, schedules and
step are in phi3skip/train/distill.py; sharding in train/parallel.py (process groups in core/distributed.py);
checkpoints in train/train_state.py; perplexity in eval/evaluate.py; metrics and progress in train/metrics.py.
Logs go to data/logs/<timestamp>.log and stdout (STDOUT=1: stdout only), metrics to <ckpt-dir>/metrics.jsonl.
HF_TOKEN is read for gated models.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from phi3skip.core import distributed
from phi3skip.core.cli import ArgumentParser, UserError, run_main
from phi3skip.core.devices import dtype_name, parse_dtype
from phi3skip.core.paths import check_apart, check_output, local
from phi3skip.data.tokenizer import check_data_tokenizer
from phi3skip.data.tokens import Batches, Mixture
from phi3skip.eval.evaluate import distributed_perplexity, val_batches
from phi3skip.eval.importance import greedy_order
from phi3skip.formats.checkpoints import from_pretrained, resolve, save_checkpoint, stored_dtype
from phi3skip.model import bypass
from phi3skip.model.config import Phi3Config
from phi3skip.model.skipsets import SHORTLIST, default_layers, parse_layers
from phi3skip.train import bypass_init, parallel
from phi3skip.train.distill import (K_DISTS, SCHEDULES, STATS, LossConfig, Schedule, adapter_step, distill_step,
                                    set_trainable, step_flops_per_token, trainable_blocks)
from phi3skip.train.job import JobConfig
from phi3skip.train.metrics import Metrics, Progress, memory_gb, peak_flops
from phi3skip.train.train_state import CheckpointManager, TrainState

log = logging.getLogger("phi3skip.train")


def parse_args(argv: list[str] | None = None) -> JobConfig:
    """train.py's flags, parsed once into the run's settings (defaults resolved, rules checked)."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="Hub id or checkpoint folder (the teacher)")
    a("--data", required=True, nargs="+", metavar="FOLDER",
      help="data folder(s) made by prepare.py (train.bin, val.bin, meta.json); several are blended (--data-weights) "
           "for training, the order and the least-squares fit, and the first one's val.bin is what train.py evaluates")
    a("--data-weights", type=float, nargs="+", metavar="W",
      help="share of each --data folder in the training sequences (default: equal shares)")
    a("--out", help="where the student and skip.json are saved")
    a("--overwrite", action="store_true", help="replace an existing --out folder")
    a("--layers", help="candidate layers in order, e.g. 30,28,26 (default: L-2, L-4, ...), or 'auto': each next "
                       "layer the one whose skipping adds the least KL given those before it "
                       "(scripts/rank_layers.py --greedy)")
    a("--num-skip", "--num_skip", type=int, help="keep only the first K candidate layers")
    a("--rank-tokens", type=int, help="--layers auto: training tokens the greedy order is chosen on")
    a("--rank-shortlist", type=int,
      help=f"--layers auto: after the first pick, re-score only the N candidates that added the least KL when last "
           f"scored (lazy greedy, default {SHORTLIST}; 0: every layer at every pick)")
    a("--schedule", help=f"one of {', '.join(SCHEDULES)} (default: sequential)")
    a("--train-scope", "--train_scope",
      help="what trains: adapters (nested's default): the base stays frozen (the full model is the teacher, "
           "exactly) and only a small bypass per skippable layer trains (phi3skip/model/bypass.py); all (sequential's "
           "default); around:R (blocks within R of the layer being made skippable); or blocks such as 20-31")
    a("--k-dist", help=f"nested: which skip sets a step trains, one of {', '.join(K_DISTS)} "
                       "(sandwich, the default: the deepest set and one drawn below it; uniform: one "
                       "k in 0..K; harmonic: two depths, P(k) ~ 1/k)")
    a("--adapter-rank", type=int,
      help="rank of each bypass's linear map (adapters; default: with --adapter-mlp's default, the bypass costs "
           "about 8%% of a block's compute: rank 64 and 128 MLP channels for SmolLM2; 0: no map, the skipped "
           "layer's attention dropped and its FFN kept, at full width by default)")
    a("--adapter-mlp", type=int,
      help="MLP channels of each bypass, started from the skipped block's most active ones (adapters; 0: a "
           "linear map only; default: 3/4 of the bypass's compute, 128 for SmolLM2; with --adapter-rank 0, the "
           "block's whole MLP)")
    a("--depth-rank", type=int,
      help="adapters: rank q of each skip depth's own low-rank corrections B A of every bypass weight (the bypasses "
           "are shared by all depths; these are not), merged into the bypasses on export (0, the default: none)")
    a("--lsq-tokens", type=int,
      help="adapters: training tokens for the least-squares initialisation of the bypasses (0: start at zero)")
    a("--lsq-check-tokens", type=int,
      help="adapters: other training tokens on which each least-squares bypass is checked, kept only in the form "
           "that gives the lowest KL, a plain skip included (0: keep every fit as is)")
    a("--lr", type=float, help="peak learning rate (default: 1e-3 for adapters, else 1e-5)")
    a("--num-epochs", "--num_epochs", type=float,
      help="epochs of train.bin per layer (sequential) or in all (nested)")
    a("--steps-per-layer", "--steps_per_layer", type=int,
      help="optimizer steps per layer (nested: times the number of layers, in all); overrides --num-epochs")
    a("--max-steps", "--max_steps", type=int,
      help="cap on all optimizer steps (sequential: split evenly over the layers)")
    a("--max-seq-len", "--max_seq_len", type=int)
    a("--batch-size", "--batch_size", type=int, help="sequences per rank per micro-batch")
    a("--grad-accum", "--grad_accum", type=int, help="micro-batches per optimizer step")
    a("--temperature", type=float)
    a("--kd-weight", "--kd_weight", type=float,
      help="weight w of KL(T||S_skip) (default: 0.01 sequential, as the original; 1.0 nested)")
    a("--ce-weight", "--ce_weight", type=float, help="weight of next-token CE on the full student")
    a("--align-weight", type=float,
      help="adapters: weight, relative to the KL's, of hidden-state alignment where skipped layers rejoin the stack "
           "(MSE of the residual stream, each dimension over the teacher's RMS; default 0: none)")
    a("--warmup", type=int,
      help="warmup steps per phase (default: 10%% of it, at most 100; adapters: 0, they start from least squares)")
    a("--min-lr-ratio", type=float,
      help="cosine decay ends at lr x this (default 0.1; adapters: 1, a constant rate, better at every depth on the "
           "demo's 34 steps, docs/quality.md)")
    a("--weight-decay", type=float)
    a("--grad-clip", type=float, help="max gradient norm (0: no clipping)")
    a("--eval-every", "--eval_every", type=int, help="evaluate every N steps (0: start and end only)")
    a("--eval-tokens", type=int, help="validation tokens per evaluation")
    a("--save-every", "--save_every", type=int,
      help="checkpoint every N steps (also at the end of each layer and of the run; 0: only those)")
    a("--keep-checkpoints", type=int)
    a("--ckpt-dir", help="checkpoints and metrics.jsonl (default: data/checkpoints/<out name>)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --ckpt-dir")
    a("--stop-at", type=int, help="stop after this step, as if interrupted (then --resume)")
    a("--compile", action="store_true", help="torch.compile each block")
    a("--activation-checkpointing", "--ac", action="store_true", help="recompute block activations in backward")
    a("--dtype", help="compute dtype: bfloat16 (CUDA default) or float32 (CPU default)")
    a("--device", help="cuda, cuda:N (one process; torchrun gives each process cuda:LOCAL_RANK) or cpu "
                        "(default: cuda when available)")
    a("--seed", type=int)
    a("--log-dir")
    a("--log-every", type=int, help="log a line every N steps")
    a("--kl-chunk", type=int, help="tokens per vocabulary chunk in the loss (default: ~64 MiB)")
    p.set_defaults(**{f.name: f.default for f in dataclasses.fields(JobConfig)})  # one place for them
    ns = p.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(JobConfig)}
    values["data"] = tuple(ns.data)
    values["data_weights"] = None if ns.data_weights is None else tuple(ns.data_weights)
    job = JobConfig(**values).resolved()
    job.check()
    return job


# Logging ----------------------------------------------------------------------------------------------------------
def setup_logging(log_dir: str, env: distributed.Env) -> Path | None:
    """The package's log (this script's and the checkpoint manager's). Rank 0: stdout and
    data/logs/<timestamp>.log (STDOUT=1: stdout only). Other ranks: warnings only."""
    root = logging.getLogger("phi3skip")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.INFO if env.is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(fmt)
    root.addHandler(out)
    if not env.is_main or os.environ.get("STDOUT", "") not in ("", "0"):
        return None
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(log_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}.log"
    fh = logging.FileHandler(path, delay=True)  # created at the first record: bad input leaves no empty log
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(fh)
    return path


# Checks -----------------------------------------------------------------------------------------------------------
def train_batches(folders: list[Path], job: JobConfig, env, vocab_size: int) -> Batches | Mixture:
    """The training sequences: one folder's train.bin, or several blended in proportion to --data-weights."""
    parts = [Batches(f / "train.bin", job.batch_size, job.max_seq_len, job.seed, env.rank, env.world_size,
                     vocab_size=vocab_size) for f in folders]
    return parts[0] if len(parts) == 1 else Mixture(parts, job.data_weights or [1.0] * len(parts))


def check_data_folder(folder: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--data {folder}: no such folder; create it with python prepare.py --model MODEL")
    for name in ("train.bin", "val.bin", "meta.json"):
        if not (path / name).is_file():
            raise UserError(f"--data {folder}: no {name}; (re-)create the folder with prepare.py")
    return path


def check_outputs(job: JobConfig, ckpt_dir: Path) -> None:
    """Every path train.py writes, checked before any work: a bad one fails now, not after the run; none may be,
    hold or lie inside what the run reads, and --out (replaced at the end) must not be or hold the others."""
    check_output(job.out, "--out", "folder", job.overwrite)
    check_output(ckpt_dir, "--ckpt-dir", "dir")
    if os.environ.get("STDOUT", "") in ("", "0"):
        check_output(job.log_dir, "--log-dir", "dir")
    outputs = {"--out": job.out, "--ckpt-dir": ckpt_dir, "--log-dir": job.log_dir}
    check_apart(outputs, [("--model", local(job.model))] + [("--data", d) for d in job.data])
    check_apart({"--out": job.out}, {}, {"--ckpt-dir": ckpt_dir, "--log-dir": job.log_dir})


def teacher_ref(model: str) -> str:
    """The teacher as skip.json records it, to be found again from any folder: a local one by its absolute path,
    a Hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else str(model)


def lr_lambda(steps: int, warmup: int, min_ratio: float):
    """Linear warmup, then cosine from 1 down to min_ratio, over one phase's steps."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


# Evaluation -------------------------------------------------------------------------------------------------------
def perplexities(student, teacher, layers, batches, env, ctx, teacher_ppl: float | None) -> dict:
    """Perplexity of the teacher (unless known), the full student and the student skipping each prefix."""
    if teacher_ppl is None:
        teacher_ppl = distributed_perplexity(teacher, batches, (), env, ctx)
        parallel.reshard(teacher)
    full = teacher_ppl if student is teacher else distributed_perplexity(student, batches, (), env, ctx)
    res = {"teacher": teacher_ppl, "student": full, "prefixes": []}
    for k in range(1, len(layers) + 1):
        res["prefixes"].append({"skip": list(layers[:k]),
                                "perplexity": distributed_perplexity(student, batches, layers[:k], env, ctx)})
    parallel.reshard(student)  # a forward without backward leaves the root gathered: put the shards back
    return res


def eval_line(res: dict) -> str:
    pre = " ".join(f"-{len(p['skip'])}:{p['perplexity']:.3f}" for p in res["prefixes"])
    return f"perplexity teacher {res['teacher']:.3f} student {res['student']:.3f} skipping {pre}"


# Setup ------------------------------------------------------------------------------------------------------------
def auto_layers(job: JobConfig, model_dir: Path, config: Phi3Config, batches: Batches, env, dtype: torch.dtype) -> str:
    """--layers auto: the greedy conditional order (each layer the one that adds the least KL given those already
    skipped), chosen on rank 0 from `--rank-tokens` of training text."""
    order = None
    if env.is_main:
        model = from_pretrained(model_dir, dtype=dtype, device=env.device)
        n = max(1, math.ceil(job.rank_tokens / (job.batch_size * job.max_seq_len)))
        sample = [batches.get(i, env.device) for i in range(n)]
        k = job.num_skip or len(default_layers(config.num_hidden_layers))
        t0 = time.perf_counter()
        order = [layer for layer, _ in greedy_order(model, sample, k, shortlist=job.rank_shortlist or None)]
        log.info(f"--layers auto: greedy order on {sum(x.numel() for x, _ in sample)} training tokens, shortlist "
                 f"{job.rank_shortlist or 'none'} ({time.perf_counter() - t0:.0f}s) -> {','.join(map(str, order))}")
        del model
    return ",".join(map(str, distributed.broadcast_object(order, env)))


def teacher_config(job: JobConfig, folders: list[Path], env: distributed.Env) -> tuple[Path, Phi3Config]:
    """The teacher's folder (downloaded once per node) and config, checked against the data and --max-seq-len."""
    if env.is_main or env.local_rank == 0:
        resolve(job.model)  # downloads once per node first
    distributed.barrier(env)
    model_dir = resolve(job.model)
    check_apart({"--out": job.out, "--ckpt-dir": job.checkpoints, "--log-dir": job.log_dir},
                {"--model": model_dir})  # a Hub model's cached folder too
    config = Phi3Config.from_json(model_dir / "config.json")
    for data in folders:
        check_data_tokenizer(data, model_dir)
    job.check_model(config)
    job.check_memory(config, env.device)  # before any weights or batches are allocated
    return model_dir, config


def plan(job: JobConfig, layers: str | None, config: Phi3Config, batches: Batches, env
         ) -> tuple[list[int], Schedule, int]:
    """Candidate layers (`layers`: --layers, or the order --layers auto chose), the schedule, and the warmup
    steps per phase."""
    layers = parse_layers(layers, config.num_hidden_layers, job.num_skip)
    steps_per_epoch = batches.steps_per_epoch // job.grad_accum
    if steps_per_epoch < 1:
        raise UserError(f"--grad-accum {job.grad_accum}: an epoch of train.bin has only {batches.steps_per_epoch} "
                        f"micro-batches of {job.batch_size} x {env.world_size} sequences")
    K = len(layers)
    if job.schedule == "sequential":
        per_phase = job.steps_per_layer or max(1, round(job.num_epochs * steps_per_epoch))
        if job.max_steps:
            per_phase = min(per_phase, max(1, job.max_steps // K))
    else:
        per_phase = job.steps_per_layer * K if job.steps_per_layer else max(1, round(job.num_epochs * steps_per_epoch))
        if job.max_steps:
            per_phase = min(per_phase, job.max_steps)
    schedule = Schedule(job.schedule, tuple(layers), per_phase, job.seed, job.k_dist)
    for phase in range(schedule.num_phases if not job.adapters else 0):  # a bad scope fails now
        scope_blocks(job, config, schedule, phase)
    warmup = job.warmup if job.warmup is not None else min(100, max(1, per_phase // 10))
    return layers, schedule, warmup


def scope_blocks(job: JobConfig, config: Phi3Config, schedule: Schedule, phase: int) -> frozenset[int] | None:
    """The blocks --train-scope trains in `phase` (None: all parameters)."""
    return trainable_blocks(job.train_scope, config.num_hidden_layers, schedule.phase_skip(phase),
                            schedule.current_layers(phase))


def load_adapter_student(model_dir: Path, config: Phi3Config, env, dtype: torch.dtype, job: JobConfig, layers, batches,
                         fit: bool):
    """Frozen base with skip adapters (least-squares initialised on training text unless resuming), sharded
    under a process group. It is its own teacher: the full path is the base model."""
    kw = dict(param_dtype=dtype, compile=job.compile)
    d_rank = bypass.default_sizes(config)[0]
    rank = d_rank if job.adapter_rank is None else job.adapter_rank
    mlp = bypass.default_mlp(config, rank) if job.adapter_mlp is None else job.adapter_mlp
    # per-depth deltas start at zero: the least-squares bypass is every depth's start
    shape = dict(rank=rank, mlp=mlp, depth_rank=job.depth_rank)
    model = None
    if env.is_main or not env.distributed:
        model = from_pretrained(model_dir, dtype=torch.float32, device=env.device)
        bypass.attach(model, layers, **shape)
        per_batch = job.batch_size * job.max_seq_len
        n = math.ceil(job.lsq_tokens / per_batch) if fit else 0
        if n:
            t0 = time.perf_counter()
            calib = [batches.get(i, env.device)[0] for i in range(n)]
            check = [batches.get(n + i, env.device)[0] for i in range(math.ceil(job.lsq_check_tokens / per_batch))]
            forms = bypass_init.fit_lstsq(model, calib, layers, check=check)
            deltas = f", per-depth deltas of rank {job.depth_rank}" if job.depth_rank else ""
            log.info(f"bypasses of layers {layers} (rank {rank}, {mlp} MLP channels{deltas}) fitted by least squares "
                     f"on {sum(x.numel() for x in calib)} training tokens in {time.perf_counter() - t0:.1f}s" +
                     (f"; kept, by KL on {sum(x.numel() for x in check)} others: " +
                      ", ".join(f"{i}: {f}" for i, f in forms.items()) if check else ""))
    if env.distributed:
        sd = model.state_dict() if env.is_main else None
        model = parallel.build_sharded(config, sd, env, dtype=torch.float32, ac=job.activation_checkpointing,
                                       prepare=lambda m: bypass.attach(m, layers, **shape), **kw)
    else:
        parallel.parallelize(model, env, ac=job.activation_checkpointing, **kw)
    return model.train()


def load_models(model_dir: Path, config: Phi3Config, env, dtype: torch.dtype, job: JobConfig):
    """Teacher (frozen, in dtype) and student (fp32 master weights), sharded under a process group."""
    kw = dict(param_dtype=dtype, compile=job.compile)
    if env.distributed:
        sd = from_pretrained(model_dir, dtype=torch.float32, device="cpu").state_dict() if env.is_main else None
        student = parallel.build_sharded(config, sd, env, dtype=torch.float32,
                                         ac=job.activation_checkpointing, **kw)
        teacher = parallel.build_sharded(config, sd, env, dtype=dtype, reshard_after_forward=True, **kw)
        del sd
    else:
        student = from_pretrained(model_dir, dtype=torch.float32, device=env.device)
        parallel.parallelize(student, env, ac=job.activation_checkpointing, **kw)
        teacher = from_pretrained(model_dir, dtype=dtype, device=env.device)
        parallel.parallelize(teacher, env, **kw)
    teacher.requires_grad_(False)
    return student.train(), teacher.eval()


# The run ------------------------------------------------------------------------------------------------------------
class Diverged(Exception):
    pass


class Trainer:
    """One run, in torchtitan's split: `__init__` sets everything up (the resumed position is read before any
    weights load), `restore` restores the checkpoint once before the loop, `train` is the loop, `train_step` one
    optimizer step, `export` the student. Checkpoints go through a CheckpointManager (phi3skip/train/train_state.py)."""

    def __init__(self, job: JobConfig, env: distributed.Env):
        self.job, self.env = job, env
        ckpt_dir = job.checkpoints
        check_outputs(job, ckpt_dir)
        log_path = setup_logging(job.log_dir, env)
        torch.manual_seed(job.seed)
        self.dtype = parse_dtype(job.dtype, default=torch.bfloat16 if env.device.type == "cuda" else torch.float32)
        folders = [check_data_folder(d) for d in job.data]
        data = folders[0]
        self.model_dir, self.config = teacher_config(job, folders, env)
        self.batches = train_batches(folders, job, env, self.config.vocab_size)
        self.val = val_batches(data / "val.bin", job.batch_size, job.max_seq_len, job.eval_tokens,
                               self.config.vocab_size)
        layers = (auto_layers(job, self.model_dir, self.config, self.batches, env, self.dtype)
                  if job.layers == "auto" else job.layers)
        self.layers, self.schedule, warmup = plan(job, layers, self.config, self.batches, env)
        kd_weight = job.kd_weight
        if kd_weight is None:  # the original recipe's 0.01 for sequential; nested trains every depth equally
            kd_weight = 0.01 if self.schedule.kind == "sequential" else 1.0
        self.loss = LossConfig(job.temperature, kd_weight, job.ce_weight, job.kl_chunk, self.dtype,
                               job.align_weight or 0.0)
        settings = job.run_settings(layers=self.schedule.layers, steps_per_phase=self.schedule.steps_per_phase,
                                    world_size=env.world_size, warmup=warmup, kd_weight=kd_weight)
        self.state = TrainState(settings, self.schedule.total_steps,
                                self.batches.steps_per_epoch)
        self.ckpt = CheckpointManager(ckpt_dir, env, job.save_every, job.keep_checkpoints)
        if job.resume:
            self.ckpt.resume(self.state)  # settings checked before any weights load
        else:
            self.ckpt.refuse_earlier_run()
        self.start = self.state.step
        self.adapters = job.adapters
        self.describe(log_path)
        if self.adapters:  # the frozen full path is the teacher
            self.student = self.teacher = load_adapter_student(self.model_dir, self.config, env, self.dtype, job,
                                                               self.layers, self.batches, fit=not job.resume)
        else:
            self.student, self.teacher = load_models(self.model_dir, self.config, env, self.dtype, job)
        self.ctx = (torch.autocast(env.device.type, dtype=self.dtype)
                    if not env.distributed and self.dtype != torch.float32 else nullcontext())
        self.metrics = Metrics(ckpt_dir / "metrics.jsonl", env, self.start if job.resume else None)
        self.peak = peak_flops(env.device)
        self.progress: Progress | None = None
        self.params: list[torch.nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def describe(self, log_path: Path | None) -> None:
        """The run in two log lines: where it runs, and what it trains."""
        job, s, c = self.job, self.schedule, self.config
        log.info(f"{self.env.world_size} process(es) on {self.env.device}, compute {dtype_name(self.dtype)}; teacher "
                 f"{job.model} ({c.num_hidden_layers} layers, {c.num_params() / 1e6:.1f}M params); log {log_path}")
        log.info(f"{s.kind} schedule over layers {self.layers}: {s.num_phases} phase(s) x {s.steps_per_phase} steps "
                 f"of {self.state.settings.global_batch} x {job.max_seq_len} tokens; "
                 + (f"loss {self.loss.kd_weight} KL(T||S_skip) per skip pass (frozen base: S_full is T)"
                    if self.adapters else f"loss KL(T||S_full) + {self.loss.kd_weight} KL(T||S_skip)")
                 + (f" + {job.ce_weight} CE" if job.ce_weight else "")
                 + (f" + {job.align_weight} x that weight x rejoin MSE" if job.align_weight else "")
                 + f" at temperature {job.temperature}; k {s.k_dist}; train scope {job.train_scope}")

    def evaluate(self, label: str, note: str = "") -> dict:
        """`perplexities` now, logged; the teacher's is measured once and kept in the TrainState."""
        res = perplexities(self.student, self.teacher, self.layers, self.val, self.env, self.ctx,
                           self.state.teacher_ppl)
        self.state.teacher_ppl = res["teacher"]
        log.info(f"{label}: {eval_line(res)}{note}")
        return res

    def begin_phase(self, phase: int) -> None:
        """What trains in `phase`, and a fresh optimizer and learning-rate schedule for it."""
        job, s = self.job, self.schedule
        self.state.phase = phase
        if self.adapters:
            self.params = bypass.set_trainable(self.student)
        else:
            self.params = set_trainable(self.student, scope_blocks(job, self.config, s, phase))
        self.optimizer = torch.optim.AdamW(self.params, lr=job.lr, weight_decay=job.weight_decay,
                                           fused=self.env.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(s.steps_per_phase, self.state.settings.warmup, job.min_lr_ratio))
        if s.kind == "sequential":
            n_train = sum(p.numel() for p in self.params)  # DTensor.numel() is the global count
            log.info(f"phase {phase + 1}/{s.num_phases}: making layer {self.layers[phase]} skippable "
                     f"(small pass skips {list(s.phase_skip(phase))}); training ~{n_train / 1e6:.1f}M params")

    def restore(self) -> None:
        """Once, before the loop: the first phase to run, and the resumed checkpoint's weights and RNG, with its
        optimizer and scheduler when it was made in that phase (one that ended the previous phase has none)."""
        saved_phase = self.state.phase
        if self.start < self.schedule.total_steps:
            self.begin_phase(self.schedule.phase(self.start))
        same = self.optimizer is not None and self.state.phase == saved_phase
        self.ckpt.restore(self.student, *((self.optimizer, self.scheduler) if same else ()))

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, skips, scale: float) -> torch.Tensor:
        """One micro-batch's loss and backward; its stats (distill.STATS)."""
        if self.adapters:
            return adapter_step(self.student, x, y, skips, self.loss, scale)
        return distill_step(self.student, self.teacher, x, y, skips, self.loss, scale)

    def train_step(self, step: int, t0: float) -> dict:
        """One optimizer step over --grad-accum micro-batches; returns its metrics row. A non-finite loss or
        gradient norm raises Diverged before the update (every rank sees the same reduced values)."""
        job, env, s = self.job, self.env, self.schedule
        stats = torch.zeros(len(STATS), device=env.device)
        flops = 0.0
        for micro in range(job.grad_accum):
            x, y = self.batches.get(step * job.grad_accum + micro, env.device)
            skips = s.skip_sets(step, micro)
            with self.ctx:
                stats += self.forward_backward(x, y, skips, 1.0 / job.grad_accum)
            flops += step_flops_per_token(self.config, job.max_seq_len, skips[0]) * x.numel()
        parallel.reshard(self.teacher)
        norm = distributed.grad_norm_clip(self.params, job.grad_clip)
        vals = dict(zip(STATS, distributed.all_reduce(stats / job.grad_accum, env, "mean").tolist()))
        gnorm = float(norm)
        if not (math.isfinite(vals["loss"]) and math.isfinite(gnorm)):
            raise Diverged(diverged_message("loss" if not math.isfinite(vals["loss"]) else "gradient norm", step + 1,
                                            self.ckpt.last, job.lr))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = dict(step=step + 1, phase=self.state.phase,
                   skip=[list(k) for m in range(job.grad_accum) for k in s.skip_sets(step, m)], **vals, lr=lr,
                   grad_norm=gnorm, tokens_per_s=self.state.settings.global_batch * job.max_seq_len / dt,
                   memory_gb=memory_gb(env.device))
        if self.peak:  # this rank's model FLOPs over its GPU's peak
            row["mfu"] = flops / dt / self.peak
        return row

    def report(self, row: dict) -> None:
        """A step's row to metrics.jsonl and the progress bar, and every --log-every steps to the log."""
        done, total = row["step"], self.schedule.total_steps
        self.metrics.write(**row)
        text = f"loss {row['loss']:.4f} kl_full {row['kl_full']:.4f} kl_skip {row['kl_skip']:.4f}"
        self.progress.update(done, text)
        if done % self.job.log_every == 0 or done == total or done == self.start + 1:
            log.info(f"step {done}/{total} {text} lr {row['lr']:.2e} |g| {row['grad_norm']:.3f} "
                     f"{row['tokens_per_s']:.0f} tok/s {row['memory_gb']:.2f} GB"
                     + (f" MFU {row['mfu']:.1%}" if "mfu" in row else "") + f" ETA {self.progress.eta(done)}")

    def train(self) -> bool:
        """The loop, from the resumed step to the last: True when done, False when stopped early (--stop-at)."""
        job, s, state = self.job, self.schedule, self.state
        if not job.resume:
            self.metrics.write(step=0, eval=self.evaluate("step 0", " (untrained student = teacher)"))
        self.restore()
        self.progress = Progress(s.total_steps, self.start, self.env)
        t0 = time.perf_counter()
        for step in range(self.start, s.total_steps):
            if s.phase(step) != state.phase:
                self.begin_phase(s.phase(step))
            self.report(self.train_step(step, t0))
            done = state.step = step + 1
            if job.eval_every and done % job.eval_every == 0 and done < s.total_steps:
                self.metrics.write(step=done, eval=self.evaluate(f"step {done}"))
            if self.ckpt.due(done, force=done % s.steps_per_phase == 0 or done == s.total_steps):
                self.ckpt.save(self.student, self.optimizer, self.scheduler, state)
            if job.stop_at is not None and job.stop_at <= done < s.total_steps:
                self.progress.close()
                log.info(f"stopping after step {done} as asked (--stop-at); continue with --resume")
                return False
            t0 = time.perf_counter()  # evaluation and checkpoints do not count against the next step's speed
        return True

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.metrics.close()

    def export(self) -> Path:
        """The student to --out with skip.json, whose perplexities are measured on the weights as saved."""
        job, env, student, config = self.job, self.env, self.student, self.config
        # skip.json must describe the files on disk: round the fp32 master weights to the dtype they are saved in
        # (the teacher's torch_dtype) before measuring. The checkpoints in --ckpt-dir keep the fp32 weights.
        out_dtype = parse_dtype(config.torch_dtype, default=torch.float32) if config.torch_dtype else torch.float32
        if self.adapters:  # the base is the teacher: saved as the teacher's files store it, bit for bit, whatever
            out_dtype = stored_dtype(self.model_dir) or out_dtype  # its config's torch_dtype says
        if out_dtype != torch.float32:
            with torch.no_grad():
                for name, p in student.named_parameters():  # elementwise, so the same on FSDP shards
                    if "skip_adapters." not in name:  # the adapters are saved in fp32
                        p.copy_(p.to(out_dtype))
        res = self.evaluate("final")
        skip_json = {"layers": self.layers, "schedule": self.schedule.kind, "teacher": teacher_ref(job.model),
                     "steps": self.schedule.total_steps, "val_tokens": sum(y.numel() for _, y in self.val),
                     "weights_dtype": dtype_name(out_dtype), "perplexity": res}
        sd = parallel.full_state_dict(student, env)
        out = Path(job.out)
        if env.is_main:
            sd, adapter_sd = bypass.split_state_dict(sd)
            sd = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in sd.items()}  # exact: already rounded
            files = {}
            if adapter_sd:  # skip adapters stay fp32, in their own file
                files[bypass.FILE] = bypass.file_bytes(adapter_sd)
                skip_json["adapters"] = student.skip_adapters.describe()
                skip_json["train_scope"] = "adapters"
            save_checkpoint(sd, config, out, copy_from=self.model_dir, files=files, extra_json={"skip.json": skip_json})
            log.info(f"saved the student to {out} (skip.json: layers {self.layers})")
        distributed.barrier(env)
        return out


def diverged_message(what: str, step: int, last_ckpt: Path | None, lr: float) -> str:
    return (f"non-finite {what} at step {step}; stopped without updating. Last good checkpoint: {last_ckpt or 'none'}; "
            + (f"continue from it with a lower learning rate: the same command with --resume --lr {lr / 2:g}"
               if last_ckpt else "start again with a lower --lr"))


def run(job: JobConfig, env: distributed.Env) -> Path | None:
    """Set up, train, save the student (None when stopped early by --stop-at)."""
    trainer = Trainer(job, env)
    try:
        finished = trainer.train()
    except Diverged as e:
        trainer.close()
        log.error(str(e))
        raise
    finally:
        trainer.close()
    return trainer.export() if finished else None


def main(argv: list[str] | None = None) -> Path | None:
    job = parse_args(argv)
    env = distributed.init(job.device)
    try:
        out = run(job, env)
    except Diverged as e:  # every rank sees the same loss, so all stop here together
        distributed.close(env)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        distributed.close(env, wait=False)  # a rank that failed alone must not wait for the others
        raise
    distributed.close(env)
    return out


if __name__ == "__main__":
    run_main(main)
