"""Forward tokens/s of phi3skip's model against transformers' Phi3ForCausalLM, side by side, same weights.

CPU (default): the converted SmolLM2-135M-Instruct. `--gpu`: a Phi-3-mini-shaped random model in bf16.
Runs are alternated (ours, theirs, ours compiled, ...) and the median ratio is printed.

    python benchmarks/bench_forward.py                      # CPU, fp32
    python benchmarks/bench_forward.py --gpu --dtype bfloat16
"""
from __future__ import annotations

import argparse
import time

import benchutil
import torch

from phi3skip import Phi3Config, Phi3ForCausalLM, from_pretrained, load_config
from phi3skip.core.cli import ArgumentParser, Range, UserError, check_range, check_ranges, run_main
from phi3skip.core.machine import REPEATS, check_memory, forward_bytes
from phi3skip.core.devices import parse_dtype

PHI3_MINI = dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                 rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)


NUMBERS = {"--batch": Range(1), "--seq": Range(1), "--rounds": REPEATS}  # --seq up to the model's positions


def check_shape(cfg: Phi3Config, batch: int, seq: int) -> None:
    """The window within the model's positions and the forward (two models', one after the other) within the memory
    available, before either model is built."""
    check_range("--seq", seq, Range(1, cfg.max_position_embeddings, note="the model's positions"))
    check_memory("--batch/--seq", f"{batch}/{seq}", forward_bytes(batch, seq, cfg.vocab_size, cfg.hidden_size,
                                                                  cfg.intermediate_size),
                 f"a forward of {batch} x {seq} tokens")


def build(args, device: str, dtype: torch.dtype):
    import transformers

    if args.gpu:  # random weights, shared by both models (a forward benchmark needs no second copy)
        cfg = Phi3Config.from_dict({**PHI3_MINI, "torch_dtype": str(dtype).removeprefix("torch.")})
        with torch.device(device):
            hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg.to_dict())).to(dtype)
        with torch.device("meta"):
            ours = Phi3ForCausalLM(cfg)
        ours.load_state_dict(hf.state_dict(), assign=True)
        ours.rotary = type(ours.rotary)(cfg).to(device)
    else:
        folder = args.model or benchutil.smollm2_dir()
        ours = from_pretrained(folder, dtype=dtype, device=device)
        hf = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return ours.eval(), hf.eval()


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: converted SmolLM2-135M-Instruct)")
    p.add_argument("--gpu", action="store_true", help="Phi-3-mini-shaped random model on CUDA")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    check_ranges(args, NUMBERS)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise UserError("--gpu needs a CUDA device")
    dtype = parse_dtype(args.dtype, default=torch.bfloat16 if args.gpu else torch.float32)
    B = args.batch or (4 if args.gpu else 2)
    T = args.seq or (2048 if args.gpu else 256)
    rounds = args.rounds or (10 if args.gpu else 7)
    check_shape(Phi3Config.from_dict(PHI3_MINI) if args.gpu else load_config(args.model or benchutil.smollm2_dir()),
                B, T)
    torch.manual_seed(0)
    ours, hf = build(args, device, dtype)
    x = torch.randint(0, ours.config.vocab_size, (B, T), device=device)

    fns = {"transformers": lambda: hf(x, use_cache=False).logits, "phi3skip": lambda: ours(x)}
    with torch.inference_mode():
        diff = (fns["phi3skip"]().float() - fns["transformers"]().float()).abs().max().item()
    print(f"forward, {B}x{T} tokens, {dtype}, {benchutil.environment(device)}; max |logit diff| {diff:.2e}",
          flush=True)
    times = measure(fns, rounds, device)
    if not args.no_compile:  # a second phase, so the eager figures are out even if compiling is slow
        compiled = torch.compile(ours)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        print(f"  (compiled in {time.perf_counter() - t0:.0f} s)", flush=True)
        fns["phi3skip+compile"] = lambda: compiled(x)
        times = measure(fns, rounds, device)
    print(f"final medians over {rounds} alternated rounds:")
    report(times, B * T)


def measure(fns, rounds: int, device: str) -> dict[str, list[float]]:
    with torch.inference_mode():
        times = benchutil.alternate(fns, rounds=rounds, warmup=1, device=device)
    report(times, None)
    return times


def report(times: dict[str, list[float]], tokens: int | None) -> None:
    base = benchutil.median(times["transformers"])
    for name, ts in times.items():
        m = benchutil.median(ts)
        rate = f"{tokens / m:10.0f} tokens/s" if tokens else ""
        print(f"  {name:18s} {rate}  median {m * 1e3:8.1f} ms   ratio vs transformers {base / m:5.2f}x", flush=True)

if __name__ == "__main__":
    run_main(main)
