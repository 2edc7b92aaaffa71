"""Distil a Phi-3 model into a student whose chosen layers can be skipped at inference.

    python train.py --data data/NAME                                   # one process: CPU or one GPU
    torchrun --nproc_per_node 8 train.py --model microsoft/Phi-3-mini-4k-instruct --data data/NAME
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN \\
        train.py --data data/NAME                                      # several nodes (shared --ckpt-dir)

The loss, schedules and step are in phi3skip/distill.py; sharding in parallel.py (process groups in
distributed.py); checkpoints in train_state.py; perplexity in evaluate.py; metrics and progress in metrics.py.
Logs go to data/logs/<timestamp>.log and stdout (STDOUT=1: stdout only), metrics to <ckpt-dir>/metrics.jsonl.
HF_TOKEN is read for gated models.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from phi3skip.model import bypass
from phi3skip.train import bypass_init
from phi3skip.core import distributed
from phi3skip.train import parallel
from phi3skip.core.cli import ArgumentParser, Range, UserError, check_ranges, run_main
from phi3skip.model.config import Phi3Config
from phi3skip.data.tokens import Batches, Mixture
from phi3skip.train.distill import (K_DISTS, SCHEDULES, STATS, LossConfig, Schedule, adapter_step, distill_step,
                                    set_trainable, step_flops_per_token, trainable_blocks)
from phi3skip.eval.evaluate import distributed_perplexity, val_batches
from phi3skip.eval.importance import SHORTLIST, greedy_order
from phi3skip.formats.checkpoints import from_pretrained, resolve, save_checkpoint, stored_dtype
from phi3skip.core.devices import dtype_name, parse_dtype
from phi3skip.train.metrics import Metrics, Progress, memory_gb, peak_flops
from phi3skip.core.paths import check_apart, check_output, local
from phi3skip.model.skipsets import default_layers, parse_layers
from phi3skip.data.tokenizer import check_data_tokenizer
from phi3skip.train.train_state import CheckpointManager, RunSettings, TrainState

log = logging.getLogger("phi3skip.train")


POSITIVE, COUNT, AT_LEAST_1 = Range(0, above=True), Range(0), Range(1)
# Every numeric flag's range, checked before any work; bounds that depend on the model (--adapter-rank, --adapter-mlp,
# --depth-rank, --num-skip, --max-seq-len) are checked by `check_model_numbers` as soon as its config is read.
NUMBERS = {
    **dict.fromkeys(("--batch-size", "--grad-accum", "--max-seq-len", "--eval-tokens", "--log-every",
                     "--keep-checkpoints", "--rank-tokens", "--steps-per-layer", "--max-steps", "--kl-chunk",
                     "--adapter-rank", "--stop-at", "--num-skip"), AT_LEAST_1),
    **dict.fromkeys(("--lsq-tokens", "--lsq-check-tokens", "--adapter-mlp", "--rank-shortlist", "--save-every",
                     "--eval-every", "--warmup", "--kd-weight", "--ce-weight", "--align-weight", "--weight-decay",
                     "--grad-clip", "--seed", "--depth-rank"), COUNT),
    **dict.fromkeys(("--lr", "--temperature", "--num-epochs", "--data-weights"), POSITIVE),
    "--min-lr-ratio": Range(0.0, 1.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="microsoft/Phi-3-mini-4k-instruct", help="Hub id or checkpoint folder (the teacher)")
    a("--data", required=True, nargs="+", metavar="FOLDER",
      help="data folder(s) made by prepare.py (train.bin, val.bin, meta.json); several are blended (--data-weights) "
           "for training, the order and the least-squares fit, and the first one's val.bin is what train.py evaluates")
    a("--data-weights", type=float, nargs="+", default=None, metavar="W",
      help="share of each --data folder in the training sequences (default: equal shares)")
    a("--out", default="data/llm_cache/student_model", help="where the student and skip.json are saved")
    a("--overwrite", action="store_true", help="replace an existing --out folder")
    a("--layers", default=None, help="candidate layers in order, e.g. 30,28,26 (default: L-2, L-4, ...), or 'auto': "
                                     "each next layer the one whose skipping adds the least KL given those "
                                     "before it (scripts/rank_layers.py --greedy)")
    a("--num-skip", "--num_skip", type=int, default=None, help="keep only the first K candidate layers")
    a("--rank-tokens", type=int, default=1024, help="--layers auto: training tokens the greedy order is chosen on")
    a("--rank-shortlist", type=int, default=SHORTLIST,
      help=f"--layers auto: after the first pick, re-score only the N candidates that added the least KL when last "
           f"scored (lazy greedy, default {SHORTLIST}; 0: every layer at every pick)")
    a("--schedule", default="sequential", help=f"one of {', '.join(SCHEDULES)} (default: sequential)")
    a("--train-scope", "--train_scope", default=None,
      help="what trains: adapters (nested's default): the base stays frozen (the full model is the teacher, "
           "exactly) and only a small bypass per skippable layer trains (phi3skip/bypass.py); all (sequential's "
           "default); around:R (blocks within R of the layer being made skippable); or blocks such as 20-31")
    a("--k-dist", default=None, help=f"nested: which skip sets a step trains, one of {', '.join(K_DISTS)} "
                                     "(sandwich, the default: the deepest set and one drawn below it; uniform: one "
                                     "k in 0..K; harmonic: two depths, P(k) ~ 1/k)")
    a("--adapter-rank", type=int, default=None,
      help="rank of each bypass's linear map (adapters; default: with --adapter-mlp's default, the bypass costs "
           "about 8%% of a block's compute: rank 64 and 128 MLP channels for SmolLM2)")
    a("--adapter-mlp", type=int, default=None,
      help="MLP channels of each bypass, started from the skipped block's most active ones (adapters; 0: a "
           "linear map only; default: 3/4 of the bypass's compute, 128 for SmolLM2)")
    a("--depth-rank", type=int, default=0,
      help="adapters: rank q of each skip depth's own low-rank corrections B A of every bypass weight (the bypasses "
           "are shared by all depths; these are not), merged into the bypasses on export (0, the default: none)")
    a("--lsq-tokens", type=int, default=16384,
      help="adapters: training tokens for the least-squares initialisation of the bypasses (0: start at zero)")
    a("--lsq-check-tokens", type=int, default=2048,
      help="adapters: other training tokens on which each least-squares bypass is checked, kept only in the form "
           "that gives the lowest KL, a plain skip included (0: keep every fit as is)")
    a("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 for adapters, else 1e-5)")
    a("--num-epochs", "--num_epochs", type=float, default=1.0,
      help="epochs of train.bin per layer (sequential) or in all (nested)")
    a("--steps-per-layer", "--steps_per_layer", type=int, default=None,
      help="optimizer steps per layer (nested: times the number of layers, in all); overrides --num-epochs")
    a("--max-steps", "--max_steps", type=int, default=None,
      help="cap on all optimizer steps (sequential: split evenly over the layers)")
    a("--max-seq-len", "--max_seq_len", type=int, default=512)
    a("--batch-size", "--batch_size", type=int, default=4, help="sequences per rank per micro-batch")
    a("--grad-accum", "--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--temperature", type=float, default=1.0)
    a("--kd-weight", "--kd_weight", type=float, default=None,
      help="weight w of KL(T||S_skip) (default: 0.01 sequential, as the original; 1.0 nested)")
    a("--ce-weight", "--ce_weight", type=float, default=0.0, help="weight of next-token CE on the full student")
    a("--align-weight", type=float, default=None,
      help="adapters: weight, relative to the KL's, of hidden-state alignment where skipped layers rejoin the stack "
           "(MSE of the residual stream, each dimension over the teacher's RMS; default 0: none)")
    a("--warmup", type=int, default=None,
      help="warmup steps per phase (default: 10%% of it, at most 100; adapters: 0, they start from least squares)")
    a("--min-lr-ratio", type=float, default=None,
      help="cosine decay ends at lr x this (default 0.1; adapters: 1, a constant rate, better at every depth on the "
           "demo's 34 steps, docs/quality.md)")
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    a("--eval-every", "--eval_every", type=int, default=500, help="evaluate every N steps (0: start and end only)")
    a("--eval-tokens", type=int, default=131072, help="validation tokens per evaluation")
    a("--save-every", "--save_every", type=int, default=500,
      help="checkpoint every N steps (also at the end of each layer and of the run; 0: only those)")
    a("--keep-checkpoints", type=int, default=2)
    a("--ckpt-dir", default=None, help="checkpoints and metrics.jsonl (default: data/checkpoints/<out name>)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --ckpt-dir")
    a("--stop-at", type=int, default=None, help="stop after this step, as if interrupted (then --resume)")
    a("--compile", action="store_true", help="torch.compile each block")
    a("--activation-checkpointing", "--ac", action="store_true", help="recompute block activations in backward")
    a("--dtype", default=None, help="compute dtype: bfloat16 (CUDA default) or float32 (CPU default)")
    a("--device", default=None, help="cuda, cuda:N (one process; torchrun gives each process cuda:LOCAL_RANK) or cpu "
                                     "(default: cuda when available)")
    a("--seed", type=int, default=0)
    a("--log-dir", default="data/logs")
    a("--log-every", type=int, default=10, help="log a line every N steps")
    a("--kl-chunk", type=int, default=None, help="tokens per vocabulary chunk in the loss (default: ~64 MiB)")
    args = p.parse_args(argv)
    if args.schedule not in SCHEDULES:
        raise UserError(f"--schedule {args.schedule!r}: unknown; use one of {', '.join(SCHEDULES)}")
    resolve_recipe(args)
    check_ranges(args, NUMBERS)
    if args.data_weights is not None and len(args.data_weights) != len(args.data):
        raise UserError(f"--data-weights: {len(args.data_weights)} weight(s) for {len(args.data)} --data folder(s); "
                        f"give one per folder")
    if args.k_dist not in K_DISTS:
        raise UserError(f"--k-dist {args.k_dist!r}: unknown; use one of {', '.join(K_DISTS)}")
    if adapters_scope(args) and args.ce_weight:
        raise UserError("--ce-weight: with --train-scope adapters the full model is the frozen teacher; drop it")
    if args.align_weight and not adapters_scope(args):
        raise UserError("--align-weight aligns the bypasses of --train-scope adapters; drop it or train adapters")
    if args.depth_rank and not adapters_scope(args):
        raise UserError("--depth-rank gives the bypasses of --train-scope adapters per-depth deltas; drop it or train "
                        "adapters")
    if args.dtype is not None and parse_dtype(args.dtype) not in (torch.bfloat16, torch.float32):
        raise UserError(f"--dtype {args.dtype}: training runs in bfloat16 or float32 (float16 would need a loss "
                        f"scaler, and its gradients underflow without one)")
    return args


def resolve_recipe(args: argparse.Namespace) -> None:
    """Defaults that depend on the schedule. nested: the frozen base with least-squares bypasses, sandwich k,
    a constant lr 1e-3 (the best recipe measured, docs/quality.md); sequential: the seed's recipe, every block
    trains."""
    nested = args.schedule == "nested"
    if args.train_scope is None:
        args.train_scope = "adapters" if nested else "all"
    if args.k_dist is None:
        args.k_dist = "sandwich" if nested else "uniform"
    adapters = adapters_scope(args)
    if args.lr is None:
        args.lr = 1e-3 if adapters else 1e-5
    if args.min_lr_ratio is None:  # adapters: a constant rate (row 20261129-030936 against 20261128-223336)
        args.min_lr_ratio = 1.0 if adapters else 0.1
    if args.warmup is None and adapters:
        args.warmup = 0


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
def data_setting(folders: list[str], weights: list[float] | None) -> str:
    """The training data as the run's settings hold it: one folder as its path (as runs always recorded it),
    a blend as each folder with its share."""
    paths = [str(Path(f).resolve()) for f in folders]
    if len(paths) == 1:
        return paths[0]
    weights = weights or [1.0] * len(paths)
    return " + ".join(f"{w / sum(weights):.6g} x {p}" for p, w in zip(paths, weights))


def train_batches(folders: list[Path], weights: list[float] | None, args, env, vocab_size: int) -> Batches | Mixture:
    """The training sequences: one folder's train.bin, or several blended in proportion to --data-weights."""
    parts = [Batches(f / "train.bin", args.batch_size, args.max_seq_len, args.seed, env.rank, env.world_size,
                     vocab_size=vocab_size) for f in folders]
    return parts[0] if len(parts) == 1 else Mixture(parts, weights or [1.0] * len(parts))


def check_data_folder(folder: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--data {folder}: no such folder; create it with python prepare.py --model MODEL")
    for name in ("train.bin", "val.bin", "meta.json"):
        if not (path / name).is_file():
            raise UserError(f"--data {folder}: no {name}; (re-)create the folder with prepare.py")
    return path


def check_outputs(args: argparse.Namespace, ckpt_dir: Path) -> None:
    """Every path train.py writes, checked before any work: a bad one fails now, not after the run; none may be,
    hold or lie inside what the run reads, and --out (replaced at the end) must not be or hold the others."""
    check_output(args.out, "--out", "folder", args.overwrite)
    check_output(ckpt_dir, "--ckpt-dir", "dir")
    if os.environ.get("STDOUT", "") in ("", "0"):
        check_output(args.log_dir, "--log-dir", "dir")
    outputs = {"--out": args.out, "--ckpt-dir": ckpt_dir, "--log-dir": args.log_dir}
    check_apart(outputs, [("--model", local(args.model))] + [("--data", d) for d in args.data])
    check_apart({"--out": args.out}, {}, {"--ckpt-dir": ckpt_dir, "--log-dir": args.log_dir})


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
def auto_layers(args, model_dir: Path, config: Phi3Config, batches: Batches, env, dtype: torch.dtype) -> str:
    """--layers auto: the greedy conditional order (each layer the one that adds the least KL given those already
    skipped), chosen on rank 0 from `--rank-tokens` of training text."""
    order = None
    if env.is_main:
        model = from_pretrained(model_dir, dtype=dtype, device=env.device)
        n = max(1, math.ceil(args.rank_tokens / (args.batch_size * args.max_seq_len)))
        sample = [batches.get(i, env.device) for i in range(n)]
        k = args.num_skip or len(default_layers(config.num_hidden_layers))
        t0 = time.perf_counter()
        order = [layer for layer, _ in greedy_order(model, sample, k, shortlist=args.rank_shortlist or None)]
        log.info(f"--layers auto: greedy order on {sum(x.numel() for x, _ in sample)} training tokens, shortlist "
                 f"{args.rank_shortlist or 'none'} ({time.perf_counter() - t0:.0f}s) -> {','.join(map(str, order))}")
        del model
    return ",".join(map(str, distributed.broadcast_object(order, env)))


def teacher_config(args, folders: list[Path], env: distributed.Env) -> tuple[Path, Phi3Config]:
    """The teacher's folder (downloaded once per node) and config, checked against the data and --max-seq-len."""
    if env.is_main or env.local_rank == 0:
        resolve(args.model)  # downloads once per node first
    distributed.barrier(env)
    model_dir = resolve(args.model)
    check_apart({"--out": args.out, "--ckpt-dir": args.ckpt_dir, "--log-dir": args.log_dir},
                {"--model": model_dir})  # a Hub model's cached folder too
    config = Phi3Config.from_json(model_dir / "config.json")
    for data in folders:
        check_data_tokenizer(data, model_dir)
    check_model_numbers(args, config)
    return model_dir, config


def check_model_numbers(args, config: Phi3Config) -> None:
    """The ranges that depend on the model, on every rank before any weights load (under torchrun a rank that
    failed alone later would leave the others waiting in a collective)."""
    L = config.num_hidden_layers
    candidates = L if args.layers == "auto" else len(parse_layers(args.layers, L))
    check_ranges(args, {"--max-seq-len": Range(1, config.max_position_embeddings, note="the model's positions"),
                        "--adapter-rank": Range(1, config.hidden_size, note="the model's hidden size"),
                        "--adapter-mlp": Range(0, config.intermediate_size, note="the model's MLP width"),
                        "--depth-rank": Range(0, config.hidden_size, note="the model's hidden size"),
                        "--num-skip": Range(1, candidates, note="the number of candidate layers")})


def plan(args, config: Phi3Config, batches: Batches, env) -> tuple[list[int], Schedule, int]:
    """Candidate layers, the schedule, and the warmup steps per phase."""
    layers = parse_layers(args.layers, config.num_hidden_layers, args.num_skip)
    steps_per_epoch = batches.steps_per_epoch // args.grad_accum
    if steps_per_epoch < 1:
        raise UserError(f"--grad-accum {args.grad_accum}: an epoch of train.bin has only {batches.steps_per_epoch} "
                        f"micro-batches of {args.batch_size} x {env.world_size} sequences")
    K = len(layers)
    if args.schedule == "sequential":
        per_phase = args.steps_per_layer or max(1, round(args.num_epochs * steps_per_epoch))
        if args.max_steps:
            per_phase = min(per_phase, max(1, args.max_steps // K))
    else:
        per_phase = args.steps_per_layer * K if args.steps_per_layer else max(1, round(args.num_epochs * steps_per_epoch))
        if args.max_steps:
            per_phase = min(per_phase, args.max_steps)
    schedule = Schedule(args.schedule, tuple(layers), per_phase, args.seed, args.k_dist)
    for phase in range(schedule.num_phases if not adapters_scope(args) else 0):  # a bad scope fails now
        scope_blocks(args, config, schedule, phase)
    warmup = args.warmup if args.warmup is not None else min(100, max(1, per_phase // 10))
    return layers, schedule, warmup


def scope_blocks(args, config: Phi3Config, schedule: Schedule, phase: int) -> frozenset[int] | None:
    """The blocks --train-scope trains in `phase` (None: all parameters)."""
    return trainable_blocks(args.train_scope, config.num_hidden_layers, schedule.phase_skip(phase),
                            schedule.current_layers(phase))


def adapters_scope(args) -> bool:
    return args.train_scope.strip().lower() == "adapters"


def run_settings(args, env: distributed.Env, schedule: Schedule, warmup: int, kd_weight: float) -> RunSettings:
    return RunSettings(model=str(args.model), data=data_setting(args.data, args.data_weights), layers=schedule.layers,
                       schedule=schedule.kind, lr=args.lr, steps_per_phase=schedule.steps_per_phase,
                       global_batch=args.batch_size * env.world_size * args.grad_accum, max_seq_len=args.max_seq_len,
                       grad_accum=args.grad_accum, temperature=args.temperature, kd_weight=kd_weight,
                       ce_weight=args.ce_weight, train_scope=args.train_scope, warmup=warmup,
                       min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       seed=args.seed, k_dist=args.k_dist, adapter_rank=args.adapter_rank, adapter_mlp=args.adapter_mlp,
                       lsq_tokens=args.lsq_tokens, align_weight=args.align_weight or None,
                       depth_rank=args.depth_rank or None)


def load_adapter_student(model_dir: Path, config: Phi3Config, env, dtype: torch.dtype, args, layers, batches,
                         fit: bool):
    """Frozen base with skip adapters (least-squares initialised on training text unless resuming), sharded
    under a process group. It is its own teacher: the full path is the base model."""
    kw = dict(param_dtype=dtype, compile=args.compile)
    d_rank, d_mlp = bypass.default_sizes(config)
    rank = args.adapter_rank or d_rank
    mlp = d_mlp if args.adapter_mlp is None else args.adapter_mlp
    # per-depth deltas start at zero: the least-squares bypass is every depth's start
    shape = dict(rank=rank, mlp=mlp, depth_rank=args.depth_rank)
    model = None
    if env.is_main or not env.distributed:
        model = from_pretrained(model_dir, dtype=torch.float32, device=env.device)
        bypass.attach(model, layers, **shape)
        per_batch = args.batch_size * args.max_seq_len
        n = math.ceil(args.lsq_tokens / per_batch) if fit else 0
        if n:
            t0 = time.perf_counter()
            calib = [batches.get(i, env.device)[0] for i in range(n)]
            check = [batches.get(n + i, env.device)[0] for i in range(math.ceil(args.lsq_check_tokens / per_batch))]
            forms = bypass_init.fit_lstsq(model, calib, layers, check=check)
            deltas = f", per-depth deltas of rank {args.depth_rank}" if args.depth_rank else ""
            log.info(f"bypasses of layers {layers} (rank {rank}, {mlp} MLP channels{deltas}) fitted by least squares "
                     f"on {sum(x.numel() for x in calib)} training tokens in {time.perf_counter() - t0:.1f}s" +
                     (f"; kept, by KL on {sum(x.numel() for x in check)} others: " +
                      ", ".join(f"{i}: {f}" for i, f in forms.items()) if check else ""))
    if env.distributed:
        sd = model.state_dict() if env.is_main else None
        model = parallel.build_sharded(config, sd, env, dtype=torch.float32, ac=args.activation_checkpointing,
                                       prepare=lambda m: bypass.attach(m, layers, **shape), **kw)
    else:
        parallel.parallelize(model, env, ac=args.activation_checkpointing, **kw)
    return model.train()


def load_models(model_dir: Path, config: Phi3Config, env, dtype: torch.dtype, args):
    """Teacher (frozen, in dtype) and student (fp32 master weights), sharded under a process group."""
    kw = dict(param_dtype=dtype, compile=args.compile)
    if env.distributed:
        sd = from_pretrained(model_dir, dtype=torch.float32, device="cpu").state_dict() if env.is_main else None
        student = parallel.build_sharded(config, sd, env, dtype=torch.float32,
                                         ac=args.activation_checkpointing, **kw)
        teacher = parallel.build_sharded(config, sd, env, dtype=dtype, reshard_after_forward=True, **kw)
        del sd
    else:
        student = from_pretrained(model_dir, dtype=torch.float32, device=env.device)
        parallel.parallelize(student, env, ac=args.activation_checkpointing, **kw)
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
    optimizer step, `export` the student. Checkpoints go through a CheckpointManager (phi3skip/train_state.py)."""

    def __init__(self, args: argparse.Namespace, env: distributed.Env):
        self.args, self.env = args, env
        ckpt_dir = Path(args.ckpt_dir or Path("data/checkpoints") / Path(args.out).name)
        check_outputs(args, ckpt_dir)
        log_path = setup_logging(args.log_dir, env)
        torch.manual_seed(args.seed)
        self.dtype = parse_dtype(args.dtype, default=torch.bfloat16 if env.device.type == "cuda" else torch.float32)
        folders = [check_data_folder(d) for d in args.data]
        data = folders[0]
        self.model_dir, self.config = teacher_config(args, folders, env)
        self.batches = train_batches(folders, args.data_weights, args, env, self.config.vocab_size)
        self.val = val_batches(data / "val.bin", args.batch_size, args.max_seq_len, args.eval_tokens,
                               self.config.vocab_size)
        if args.layers == "auto":
            args.layers = auto_layers(args, self.model_dir, self.config, self.batches, env, self.dtype)
        self.layers, self.schedule, warmup = plan(args, self.config, self.batches, env)
        kd_weight = args.kd_weight
        if kd_weight is None:  # the original recipe's 0.01 for sequential; nested trains every depth equally
            kd_weight = 0.01 if self.schedule.kind == "sequential" else 1.0
        self.loss = LossConfig(args.temperature, kd_weight, args.ce_weight, args.kl_chunk, self.dtype,
                               args.align_weight or 0.0)
        self.state = TrainState(run_settings(args, env, self.schedule, warmup, kd_weight), self.schedule.total_steps,
                                self.batches.steps_per_epoch)
        self.ckpt = CheckpointManager(ckpt_dir, env, args.save_every, args.keep_checkpoints)
        if args.resume:
            self.ckpt.resume(self.state)  # settings checked before any weights load
        else:
            self.ckpt.refuse_earlier_run()
        self.start = self.state.step
        self.adapters = adapters_scope(args)
        self.describe(log_path)
        if self.adapters:  # the frozen full path is the teacher
            self.student = self.teacher = load_adapter_student(self.model_dir, self.config, env, self.dtype, args,
                                                               self.layers, self.batches, fit=not args.resume)
        else:
            self.student, self.teacher = load_models(self.model_dir, self.config, env, self.dtype, args)
        self.ctx = (torch.autocast(env.device.type, dtype=self.dtype)
                    if not env.distributed and self.dtype != torch.float32 else nullcontext())
        self.metrics = Metrics(ckpt_dir / "metrics.jsonl", env, self.start if args.resume else None)
        self.peak = peak_flops(env.device)
        self.progress: Progress | None = None
        self.params: list[torch.nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def describe(self, log_path: Path | None) -> None:
        """The run in two log lines: where it runs, and what it trains."""
        a, s, c = self.args, self.schedule, self.config
        log.info(f"{self.env.world_size} process(es) on {self.env.device}, compute {dtype_name(self.dtype)}; teacher "
                 f"{a.model} ({c.num_hidden_layers} layers, {c.num_params() / 1e6:.1f}M params); log {log_path}")
        log.info(f"{s.kind} schedule over layers {self.layers}: {s.num_phases} phase(s) x {s.steps_per_phase} steps "
                 f"of {self.state.settings.global_batch} x {a.max_seq_len} tokens; "
                 + (f"loss {self.loss.kd_weight} KL(T||S_skip) per skip pass (frozen base: S_full is T)"
                    if self.adapters else f"loss KL(T||S_full) + {self.loss.kd_weight} KL(T||S_skip)")
                 + (f" + {a.ce_weight} CE" if a.ce_weight else "")
                 + (f" + {a.align_weight} x that weight x rejoin MSE" if a.align_weight else "")
                 + f" at temperature {a.temperature}; k {s.k_dist}; train scope {a.train_scope}")

    def evaluate(self, label: str, note: str = "") -> dict:
        """`perplexities` now, logged; the teacher's is measured once and kept in the TrainState."""
        res = perplexities(self.student, self.teacher, self.layers, self.val, self.env, self.ctx,
                           self.state.teacher_ppl)
        self.state.teacher_ppl = res["teacher"]
        log.info(f"{label}: {eval_line(res)}{note}")
        return res

    def begin_phase(self, phase: int) -> None:
        """What trains in `phase`, and a fresh optimizer and learning-rate schedule for it."""
        a, s = self.args, self.schedule
        self.state.phase = phase
        if self.adapters:
            self.params = bypass.set_trainable(self.student)
        else:
            self.params = set_trainable(self.student, scope_blocks(a, self.config, s, phase))
        self.optimizer = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=a.weight_decay,
                                           fused=self.env.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(s.steps_per_phase, self.state.settings.warmup, a.min_lr_ratio))
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
        a, env, s = self.args, self.env, self.schedule
        stats = torch.zeros(len(STATS), device=env.device)
        flops = 0.0
        for micro in range(a.grad_accum):
            x, y = self.batches.get(step * a.grad_accum + micro, env.device)
            skips = s.skip_sets(step, micro)
            with self.ctx:
                stats += self.forward_backward(x, y, skips, 1.0 / a.grad_accum)
            flops += step_flops_per_token(self.config, a.max_seq_len, skips[0]) * x.numel()
        parallel.reshard(self.teacher)
        norm = distributed.grad_norm_clip(self.params, a.grad_clip)
        vals = dict(zip(STATS, distributed.all_reduce(stats / a.grad_accum, env, "mean").tolist()))
        gnorm = float(norm)
        if not (math.isfinite(vals["loss"]) and math.isfinite(gnorm)):
            raise Diverged(diverged_message("loss" if not math.isfinite(vals["loss"]) else "gradient norm", step + 1,
                                            self.ckpt.last, a.lr))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = dict(step=step + 1, phase=self.state.phase,
                   skip=[list(k) for m in range(a.grad_accum) for k in s.skip_sets(step, m)], **vals, lr=lr,
                   grad_norm=gnorm, tokens_per_s=self.state.settings.global_batch * a.max_seq_len / dt,
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
        if done % self.args.log_every == 0 or done == total or done == self.start + 1:
            log.info(f"step {done}/{total} {text} lr {row['lr']:.2e} |g| {row['grad_norm']:.3f} "
                     f"{row['tokens_per_s']:.0f} tok/s {row['memory_gb']:.2f} GB"
                     + (f" MFU {row['mfu']:.1%}" if "mfu" in row else "") + f" ETA {self.progress.eta(done)}")

    def train(self) -> bool:
        """The loop, from the resumed step to the last: True when done, False when stopped early (--stop-at)."""
        a, s, state = self.args, self.schedule, self.state
        if not a.resume:
            self.metrics.write(step=0, eval=self.evaluate("step 0", " (untrained student = teacher)"))
        self.restore()
        self.progress = Progress(s.total_steps, self.start, self.env)
        t0 = time.perf_counter()
        for step in range(self.start, s.total_steps):
            if s.phase(step) != state.phase:
                self.begin_phase(s.phase(step))
            self.report(self.train_step(step, t0))
            done = state.step = step + 1
            if a.eval_every and done % a.eval_every == 0 and done < s.total_steps:
                self.metrics.write(step=done, eval=self.evaluate(f"step {done}"))
            if self.ckpt.due(done, force=done % s.steps_per_phase == 0 or done == s.total_steps):
                self.ckpt.save(self.student, self.optimizer, self.scheduler, state)
            if a.stop_at is not None and a.stop_at <= done < s.total_steps:
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
        a, env, student, config = self.args, self.env, self.student, self.config
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
        skip_json = {"layers": self.layers, "schedule": self.schedule.kind, "teacher": teacher_ref(a.model),
                     "steps": self.schedule.total_steps, "val_tokens": sum(y.numel() for _, y in self.val),
                     "weights_dtype": dtype_name(out_dtype), "perplexity": res}
        sd = parallel.full_state_dict(student, env)
        out = Path(a.out)
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


def run(args: argparse.Namespace, env: distributed.Env) -> Path | None:
    """Set up, train, save the student (None when stopped early by --stop-at)."""
    trainer = Trainer(args, env)
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
    args = parse_args(argv)
    env = distributed.init(args.device)
    try:
        out = run(args, env)
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
