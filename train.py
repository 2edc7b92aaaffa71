"""Distil a Phi-3 model into a student whose chosen layers can be skipped at inference.

    python train.py --data data/NAME                                   # one process: CPU or one GPU
    torchrun --nproc_per_node 8 train.py --model microsoft/Phi-3-mini-4k-instruct --data data/NAME
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN \\
        train.py --data data/NAME                                      # several nodes (shared --ckpt-dir)

The loss, schedules and step are in phi3skip/distill.py; sharding in parallel.py; checkpoints in
train_state.py; perplexity in evaluate.py. Logs go to data/logs/<timestamp>.log and stdout (STDOUT=1:
stdout only), metrics to <ckpt-dir>/metrics.jsonl. HF_TOKEN is read for gated models.
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

from phi3skip import bypass, distributed, parallel, train_state
from phi3skip.cli import ArgumentParser, UserError, run_main
from phi3skip.config import Phi3Config
from phi3skip.data import Batches
from phi3skip.distill import (K_DISTS, SCHEDULES, STATS, LossConfig, Schedule, adapter_step, default_layers,
                              distill_step, parse_layers, set_trainable, step_flops_per_token,
                              trainable_blocks)
from phi3skip.evaluate import token_nll, val_batches
from phi3skip.importance import greedy_order
from phi3skip.io import dtype_name, from_pretrained, parse_dtype, resolve, save_checkpoint
from phi3skip.metrics import Metrics, Progress, memory_gb, peak_flops
from phi3skip.paths import check_apart, check_output
from phi3skip.tokenizer import check_data_tokenizer

log = logging.getLogger("phi3skip.train")

# Settings that must be the same to resume a run exactly.
RUN_KEYS = ("model", "data", "layers", "schedule", "lr", "steps_per_phase", "global_batch", "max_seq_len",
            "grad_accum", "temperature", "kd_weight", "ce_weight", "train_scope", "warmup", "min_lr_ratio",
            "weight_decay", "grad_clip", "seed", "k_dist", "adapter_rank", "lsq_tokens")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="microsoft/Phi-3-mini-4k-instruct", help="Hub id or checkpoint folder (the teacher)")
    a("--data", required=True, help="data folder made by prepare.py (train.bin, val.bin, meta.json)")
    a("--out", default="data/llm_cache/student_model", help="where the student and skip.json are saved")
    a("--overwrite", action="store_true", help="replace an existing --out folder")
    a("--layers", default=None, help="candidate layers in order, e.g. 30,28,26 (default: L-2, L-4, ...), or 'auto': "
                                     "each next layer the one whose skipping adds the least KL given those "
                                     "before it (scripts/rank_layers.py --greedy)")
    a("--num-skip", "--num_skip", type=int, default=None, help="keep only the first K candidate layers")
    a("--rank-tokens", type=int, default=1024, help="--layers auto: training tokens the greedy order is chosen on")
    a("--schedule", default="sequential", help=f"one of {', '.join(SCHEDULES)} (default: sequential)")
    a("--train-scope", "--train_scope", default="all",
      help="what trains: all (default), around:R (blocks within R of the layer being made skippable), "
           "blocks such as 20-31, or adapters: the base stays frozen (the full model is the teacher, exactly) "
           "and only a small bypass per skippable layer trains (phi3skip/bypass.py)")
    a("--k-dist", default="uniform", help=f"nested: which skip sets a step trains, one of {', '.join(K_DISTS)} "
                                          "(sandwich: the deepest set and one drawn below it)")
    a("--adapter-rank", type=int, default=None, help="rank of each bypass (adapters; default: about 2%% of a block's compute)")
    a("--lsq-tokens", type=int, default=16384,
      help="adapters: training tokens for the least-squares initialisation of the bypasses (0: start at zero)")
    a("--lr", type=float, default=1e-5)
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
    a("--warmup", type=int, default=None, help="warmup steps per phase (default: 10%% of it, at most 100)")
    a("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at lr x this")
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
    a("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a("--seed", type=int, default=0)
    a("--log-dir", default="data/logs")
    a("--log-every", type=int, default=10, help="log a line every N steps")
    a("--kl-chunk", type=int, default=None, help="tokens per vocabulary chunk in the loss (default: ~64 MiB)")
    args = p.parse_args(argv)
    if args.schedule not in SCHEDULES:
        raise UserError(f"--schedule {args.schedule!r}: unknown; use one of {', '.join(SCHEDULES)}")
    for name in ("batch_size", "grad_accum", "max_seq_len", "eval_tokens", "log_every", "keep_checkpoints", "rank_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.k_dist not in K_DISTS:
        raise UserError(f"--k-dist {args.k_dist!r}: unknown; use one of {', '.join(K_DISTS)}")
    if args.train_scope.strip().lower() == "adapters" and args.ce_weight:
        raise UserError("--ce-weight: with --train-scope adapters the full model is the frozen teacher; drop it")
    if args.lsq_tokens < 0:
        raise UserError(f"--lsq-tokens must be >= 0, got {args.lsq_tokens}")
    for name in ("steps_per_layer", "max_steps", "kl_chunk", "adapter_rank", "stop_at"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "temperature", "num_epochs"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("save_every", "eval_every", "warmup", "kd_weight", "ce_weight", "weight_decay", "grad_clip"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:  # `not >=` also catches NaN
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise UserError(f"--min-lr-ratio must be between 0 and 1, got {args.min_lr_ratio}")
    if args.dtype is not None and parse_dtype(args.dtype) not in (torch.bfloat16, torch.float32):
        raise UserError(f"--dtype {args.dtype}: training runs in bfloat16 or float32 (float16 would need a loss "
                        f"scaler, and its gradients underflow without one)")
    return args


# Logging -------------------------------------------------------------------------------------
def setup_logging(log_dir: str, env: distributed.Env) -> Path | None:
    """Rank 0: stdout and data/logs/<timestamp>.log (STDOUT=1: stdout only). Other ranks: warnings only."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(fmt)
    log.addHandler(out)
    if not env.is_main or os.environ.get("STDOUT", "") not in ("", "0"):
        return None
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(log_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}.log"
    fh = logging.FileHandler(path, delay=True)  # created at the first record: bad input leaves no empty log
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    return path


# Checks -----------------------------------------------------------------------------------------------------------
def check_data_folder(folder: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--data {folder}: no such folder; create it with python prepare.py --model MODEL")
    for name in ("train.bin", "val.bin", "meta.json"):
        if not (path / name).is_file():
            raise UserError(f"--data {folder}: no {name}; (re-)create the folder with prepare.py")
    return path


def check_outputs(args: argparse.Namespace, ckpt_dir: Path) -> None:
    """Every path train.py writes, checked before any work: a bad one fails now, not after the run; and --out
    (replaced at the end) must not be or hold what the run reads or keeps, nor sit inside the teacher."""
    check_output(args.out, "--out", "folder", args.overwrite)
    check_output(ckpt_dir, "--ckpt-dir", "dir")
    if os.environ.get("STDOUT", "") in ("", "0"):
        check_output(args.log_dir, "--log-dir", "dir")
    check_apart(args.out, "--out", {"--model": args.model if Path(args.model).exists() else None}, inside_too=True)
    check_apart(args.out, "--out", {"--data": args.data, "--ckpt-dir": ckpt_dir, "--log-dir": args.log_dir})


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
def run_perplexity(model, skip, batches, env: distributed.Env, ctx) -> float:
    """Perplexity over `batches`, split across ranks (every rank makes the same number of calls)."""
    mine = batches[env.rank::env.world_size]
    rounds = math.ceil(len(batches) / env.world_size)
    tot = torch.zeros(2, dtype=torch.float64, device=env.device)
    for i in range(rounds):
        x, y = mine[i] if i < len(mine) else batches[0]  # a padding call keeps FSDP in step; its result is dropped
        with ctx:
            nll, n = token_nll(model, x.to(env.device), y.to(env.device), skip)
        if i < len(mine):
            tot[0] += nll.double()
            tot[1] += n
    distributed.all_reduce(tot, env)
    return math.exp(tot[0].item() / tot[1].item())


def evaluate(student, teacher, layers, batches, env, ctx, teacher_ppl: float | None) -> dict:
    """Perplexity of the teacher (unless known), the full student and the student skipping each prefix."""
    if teacher_ppl is None:
        teacher_ppl = run_perplexity(teacher, (), batches, env, ctx)
        parallel.reshard(teacher)
    full = teacher_ppl if student is teacher else run_perplexity(student, (), batches, env, ctx)
    res = {"teacher": teacher_ppl, "student": full, "prefixes": []}
    for k in range(1, len(layers) + 1):
        res["prefixes"].append({"skip": list(layers[:k]),
                                "perplexity": run_perplexity(student, layers[:k], batches, env, ctx)})
    parallel.reshard(student)  # a forward without backward leaves the root gathered: put the shards back
    return res


def eval_line(res: dict) -> str:
    pre = " ".join(f"-{len(p['skip'])}:{p['perplexity']:.3f}" for p in res["prefixes"])
    return f"perplexity teacher {res['teacher']:.3f} student {res['student']:.3f} skipping {pre}"


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
        order = [layer for layer, _ in greedy_order(model, sample, k)]
        log.info(f"--layers auto: greedy order on {sum(x.numel() for x, _ in sample)} training tokens "
                 f"({time.perf_counter() - t0:.0f}s) -> {','.join(map(str, order))}")
        del model
    return ",".join(map(str, distributed.broadcast_object(order, env)))


# The run ------------------------------------------------------------------------------------------------------------
class Diverged(Exception):
    pass


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
        trainable_blocks(args.train_scope, config.num_hidden_layers, schedule.phase_skip(phase), current_layers(schedule, phase))
    warmup = args.warmup if args.warmup is not None else min(100, max(1, per_phase // 10))
    return layers, schedule, warmup


def current_layers(schedule: Schedule, phase: int) -> tuple[int, ...]:
    """The layers being made skippable in a phase (around:R trains the blocks around them)."""
    return schedule.layers[phase:phase + 1] if schedule.kind == "sequential" else schedule.layers


def adapters_scope(args) -> bool:
    return args.train_scope.strip().lower() == "adapters"


def load_adapter_student(model_dir: Path, config: Phi3Config, env, dtype: torch.dtype, args, layers, batches,
                         fit: bool):
    """Frozen base with skip adapters (least-squares initialised on training text unless resuming), sharded
    under a process group. It is its own teacher: the full path is the base model."""
    kw = dict(param_dtype=dtype, compile=args.compile)
    rank = args.adapter_rank or bypass.default_rank(config)
    model = None
    if env.is_main or not env.distributed:
        model = from_pretrained(model_dir, dtype=torch.float32, device=env.device)
        bypass.attach(model, layers, rank)
        n = math.ceil(args.lsq_tokens / (args.batch_size * args.max_seq_len)) if fit else 0
        if n:
            t0 = time.perf_counter()
            calib = [batches.get(i, env.device)[0] for i in range(n)]
            bypass.fit_lstsq(model, calib, layers)
            log.info(f"bypasses of layers {layers} (rank {rank}) fitted by least squares on "
                     f"{sum(x.numel() for x in calib)} training tokens in {time.perf_counter() - t0:.1f}s")
    if env.distributed:
        sd = model.state_dict() if env.is_main else None
        model = parallel.build_sharded(config, sd, env, dtype=torch.float32, ac=args.activation_checkpointing,
                                       prepare=lambda m: bypass.attach(m, layers, rank), **kw)
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


def run(args: argparse.Namespace, env: distributed.Env) -> Path | None:
    ckpt_dir = Path(args.ckpt_dir or Path("data/checkpoints") / Path(args.out).name)
    check_outputs(args, ckpt_dir)
    log_path = setup_logging(args.log_dir, env)
    torch.manual_seed(args.seed)
    dtype = parse_dtype(args.dtype, default=torch.bfloat16 if env.device.type == "cuda" else torch.float32)
    data = check_data_folder(args.data)
    if env.is_main or env.local_rank == 0:
        model_dir = resolve(args.model)  # downloads once per node first
    distributed.barrier(env)
    model_dir = resolve(args.model)
    check_apart(args.out, "--out", {"--model": model_dir}, inside_too=True)  # a Hub model's cached folder too
    config = Phi3Config.from_json(model_dir / "config.json")
    check_data_tokenizer(data, model_dir)
    if args.max_seq_len > config.max_position_embeddings:
        raise UserError(f"--max-seq-len {args.max_seq_len} exceeds the model's {config.max_position_embeddings} positions")
    batches = Batches(data / "train.bin", args.batch_size, args.max_seq_len, args.seed, env.rank, env.world_size,
                      vocab_size=config.vocab_size)
    val = val_batches(data / "val.bin", args.batch_size, args.max_seq_len, args.eval_tokens, config.vocab_size)
    if args.layers == "auto":
        args.layers = auto_layers(args, model_dir, config, batches, env, dtype)
    layers, schedule, warmup = plan(args, config, batches, env)
    kd_weight = args.kd_weight if args.kd_weight is not None else (0.01 if schedule.kind == "sequential" else 1.0)
    loss_cfg = LossConfig(args.temperature, kd_weight, args.ce_weight, args.kl_chunk, dtype)
    settings = dict(model=str(args.model), data=str(Path(args.data).resolve()), layers=layers, schedule=schedule.kind,
                    lr=args.lr, steps_per_phase=schedule.steps_per_phase,
                    global_batch=args.batch_size * env.world_size * args.grad_accum, max_seq_len=args.max_seq_len,
                    grad_accum=args.grad_accum, temperature=args.temperature, kd_weight=kd_weight,
                    ce_weight=args.ce_weight, train_scope=args.train_scope, warmup=warmup,
                    min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                    seed=args.seed, k_dist=args.k_dist, adapter_rank=args.adapter_rank, lsq_tokens=args.lsq_tokens)
    resume_from, trainer, lr_scale = None, {}, 1.0
    if args.resume:
        resume_from, damaged = train_state.resumable(ckpt_dir, env)
        for path, why in damaged:
            log.warning(f"checkpoint {path} is damaged ({why}); "
                        + (f"resuming from {resume_from} instead" if resume_from else "no older one is intact"))
        if resume_from is None:
            raise UserError(f"--resume: no intact checkpoint in {ckpt_dir}"
                            + (f" ({damaged[0][0].name}: {damaged[0][1]})" if damaged else "")
                            + "; start without --resume")
        trainer = train_state.read_trainer(resume_from)
        saved = trainer["settings"]
        # A lower --lr is allowed: it is how a run that diverged continues from its last good checkpoint.
        diff = [k for k in RUN_KEYS if saved.get(k) != settings[k] and not (k == "lr" and settings[k] < saved[k])]
        if diff:
            k = diff[0]
            raise UserError(f"--resume: {resume_from} was made with {k}={saved.get(k)!r}, this run has "
                            f"{settings[k]!r}; use the same settings (a lower --lr is allowed) or another --ckpt-dir")
        lr_scale = settings["lr"] / saved["lr"]
    elif train_state.latest(ckpt_dir) is not None:
        raise UserError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, or choose "
                        f"another --ckpt-dir (or delete that folder)")

    log.info(f"{env.world_size} process(es) on {env.device}, compute {dtype_name(dtype)}; teacher {args.model} "
             f"({config.num_hidden_layers} layers, {config.num_params() / 1e6:.1f}M params); log {log_path}")
    log.info(f"{schedule.kind} schedule over layers {layers}: {schedule.num_phases} phase(s) x "
             f"{schedule.steps_per_phase} steps of {settings['global_batch']} x {args.max_seq_len} tokens; "
             + (f"loss {kd_weight} KL(T||S_skip) per skip pass (frozen base: S_full is T)" if adapters_scope(args)
                else f"loss KL(T||S_full) + {kd_weight} KL(T||S_skip)")
             + (f" + {args.ce_weight} CE" if args.ce_weight else "")
             + f" at temperature {args.temperature}; k {schedule.k_dist}; train scope {args.train_scope}")
    if adapters_scope(args):
        student = load_adapter_student(model_dir, config, env, dtype, args, layers, batches, fit=not args.resume)
        teacher = student  # the frozen full path is the teacher

        def step_fn(x, y, skips, scale):
            return adapter_step(student, x, y, skips, loss_cfg, scale)
    else:
        student, teacher = load_models(model_dir, config, env, dtype, args)

        def step_fn(x, y, skips, scale):
            return distill_step(student, teacher, x, y, skips, loss_cfg, scale)
    ctx = (torch.autocast(env.device.type, dtype=dtype) if not env.distributed and dtype != torch.float32
           else nullcontext())

    start, opt_phase = 0, None
    if args.resume:
        start, opt_phase = trainer["step"], trainer["phase"]
        log.info(f"resuming from {resume_from} at step {start}"
                 + (f" with --lr {args.lr:g} (was {trainer['settings']['lr']:g})" if lr_scale != 1 else ""))
    metrics = Metrics(ckpt_dir / "metrics.jsonl", env, start if args.resume else None)
    teacher_ppl = trainer.get("teacher_ppl")
    if not args.resume:
        res = evaluate(student, teacher, layers, val, env, ctx, None)
        teacher_ppl = res["teacher"]
        log.info(f"step 0: {eval_line(res)} (untrained student = teacher)")
        metrics.write(step=0, eval=res)

    total = schedule.total_steps
    if args.resume and start >= total:  # a finished run: only the final evaluation and output remain
        train_state.load(resume_from, student, env)
    peak = peak_flops(env.device)
    tokens_per_step = settings["global_batch"] * args.max_seq_len
    progress = Progress(total, start, env)
    phase, optimizer, scheduler, params = None, None, None, []
    last_ckpt = resume_from if args.resume else None
    t_last = time.perf_counter()

    def save(step_done: int) -> Path:
        trainer_state = dict(step=step_done, phase=phase, settings=settings, teacher_ppl=teacher_ppl,
                             data_position=step_done * args.grad_accum, epoch=batches.epoch(step_done * args.grad_accum),
                             total_steps=total)
        path = train_state.save(ckpt_dir, step_done, student, optimizer, scheduler, trainer_state, env,
                                keep=args.keep_checkpoints)
        log.info(f"checkpoint {path}")
        return path

    try:
        for step in range(start, total):
            if schedule.phase(step) != phase:  # a new phase: what trains, a fresh optimizer and schedule
                phase = schedule.phase(step)
                if adapters_scope(args):
                    params = bypass.set_trainable(student)
                else:
                    blocks = trainable_blocks(args.train_scope, config.num_hidden_layers, schedule.phase_skip(phase),
                                              current_layers(schedule, phase))
                    params = set_trainable(student, blocks)
                optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                              fused=env.device.type == "cuda")
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lr_lambda(schedule.steps_per_phase, warmup, args.min_lr_ratio))
                if args.resume and step == start and opt_phase == phase:
                    train_state.load(resume_from, student, env, optimizer, scheduler, lr_scale=lr_scale)
                elif args.resume and step == start:
                    train_state.load(resume_from, student, env)  # the checkpoint ended the previous phase
                n_train = sum(p.numel() for p in params)  # DTensor.numel() is the global count
                if schedule.kind == "sequential":
                    log.info(f"phase {phase + 1}/{schedule.num_phases}: making layer {layers[phase]} skippable "
                             f"(small pass skips {list(schedule.phase_skip(phase))}); training ~{n_train / 1e6:.1f}M params")
            stats = torch.zeros(len(STATS), device=env.device)
            flops = 0.0
            for micro in range(args.grad_accum):
                x, y = batches.get(step * args.grad_accum + micro, env.device)
                skips = schedule.skip_sets(step, micro)
                with ctx:
                    stats += step_fn(x, y, skips, 1.0 / args.grad_accum)
                flops += step_flops_per_token(config, args.max_seq_len, skips[0]) * x.numel()
            parallel.reshard(teacher)
            norm = distributed.grad_norm_clip(params, args.grad_clip)
            stats = distributed.all_reduce(stats / args.grad_accum, env, "mean")
            vals = dict(zip(STATS, stats.tolist()))
            gnorm = float(norm)
            if not (math.isfinite(vals["loss"]) and math.isfinite(gnorm)):
                raise Diverged(f"non-finite {'loss' if not math.isfinite(vals['loss']) else 'gradient norm'} at step "
                               f"{step + 1}; stopped without updating. Last good checkpoint: {last_ckpt or 'none'}; "
                               + (f"continue from it with a lower learning rate: the same command with --resume "
                                  f"--lr {args.lr / 2:g}" if last_ckpt else "start again with a lower --lr"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            dt = time.perf_counter() - t_last
            row = dict(step=done, phase=phase,
                       skip=[list(k) for m in range(args.grad_accum) for k in schedule.skip_sets(step, m)],
                       **vals, lr=lr, grad_norm=gnorm,
                       tokens_per_s=tokens_per_step / dt, memory_gb=memory_gb(env.device))
            if peak:  # this rank's model FLOPs over its GPU's peak
                row["mfu"] = flops / dt / peak
            metrics.write(**row)
            text = f"loss {vals['loss']:.4f} kl_full {vals['kl_full']:.4f} kl_skip {vals['kl_skip']:.4f}"
            progress.update(done, text)
            if done % args.log_every == 0 or done == total or done == start + 1:
                log.info(f"step {done}/{total} {text} lr {lr:.2e} |g| {gnorm:.3f} "
                         f"{row['tokens_per_s']:.0f} tok/s {row['memory_gb']:.2f} GB"
                         + (f" MFU {row['mfu']:.1%}" if peak else "") + f" ETA {progress.eta(done)}")
            if args.eval_every and done % args.eval_every == 0 and done < total:
                res = evaluate(student, teacher, layers, val, env, ctx, teacher_ppl)
                log.info(f"step {done}: {eval_line(res)}")
                metrics.write(step=done, eval=res)
            phase_end = done % schedule.steps_per_phase == 0
            if (args.save_every and done % args.save_every == 0) or phase_end or done == total:
                last_ckpt = save(done)
            if args.stop_at is not None and done >= args.stop_at and done < total:
                progress.close()
                log.info(f"stopping after step {done} as asked (--stop-at); continue with --resume")
                return None
            t_last = time.perf_counter()  # evaluation and checkpoints do not count against the next step's speed
    except Diverged as e:
        progress.close()
        log.error(str(e))
        raise
    finally:
        metrics.close()
    progress.close()

    # skip.json must describe the files on disk: round the fp32 master weights to the dtype they are saved in (the
    # teacher's torch_dtype) before measuring. The checkpoints in --ckpt-dir keep the fp32 weights.
    out_dtype = parse_dtype(config.torch_dtype, default=torch.float32) if config.torch_dtype else torch.float32
    if out_dtype != torch.float32:
        with torch.no_grad():
            for name, p in student.named_parameters():  # elementwise, so the same on FSDP shards
                if "skip_adapters." not in name:  # the adapters are saved in fp32
                    p.copy_(p.to(out_dtype))
    res = evaluate(student, teacher, layers, val, env, ctx, teacher_ppl)
    log.info(f"final: {eval_line(res)}")
    skip_json = {"layers": layers, "schedule": schedule.kind, "teacher": teacher_ref(args.model), "steps": total,
                 "val_tokens": sum(y.numel() for _, y in val), "weights_dtype": dtype_name(out_dtype),
                 "perplexity": res}
    sd = parallel.full_state_dict(student, env)
    out = Path(args.out)
    if env.is_main:
        sd, adapter_sd = bypass.split_state_dict(sd)
        sd = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in sd.items()}  # exact: already rounded
        files = {}
        if adapter_sd:  # skip adapters stay fp32, in their own file
            files[bypass.FILE] = bypass.file_bytes(adapter_sd)
            skip_json["adapters"] = student.skip_adapters.describe()
            skip_json["train_scope"] = "adapters"
        save_checkpoint(sd, config, out, copy_from=model_dir, files=files, extra_json={"skip.json": skip_json})
        log.info(f"saved the student to {out} (skip.json: layers {layers})")
    distributed.barrier(env)
    return out


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
