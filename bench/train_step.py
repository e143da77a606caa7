"""
Benchmark: train.py's training step against the bare minimum step, and its latent-cache loader
against one torch.load per sample (the published code's data path).

    python bench/train_step.py                        # tiny SD-shaped model, CPU or GPU
    python bench/train_step.py --full-size --json     # SD v1.4 shapes, random weights (GPU)
    python bench/train_step.py --sdxl                 # tiny SDXL-shaped model, KOALA-700M student
    python bench/train_step.py --teacher CompVis/stable-diffusion-v1-4 --batch-size 64 --mixed-precision bf16

"Ours" is train.py itself, run in this process on a synthetic cache (its log's step_time per interval
of --warmup steps, the first dropped, the fastest kept): data loading, random conditioning, tokenisation,
frozen text encoder(s), teacher, student with feature hooks and projections, every loss term, clipping,
AdamW, EMA, logging.
"Bare" is the least any distillation step does: teacher forward, student forward/backward on the
output loss, AdamW, with the batch and the text embedding already on the device, no hooks, no
conditioning, no logging, timed over the same intervals. Same models, precision and batch.
Ours and bare alternate for --rounds rounds and the fastest of each is kept, so a noisy moment on a
shared machine slows a round of both, not one side. Target: ours <= 1.10x bare.
Loader: batches of --batch-size latents (4 x 64 x 64, 512 px) with captions, page cache warm for both
sides. Target: ours >= 10x. Prints a table; with --json also one JSON object on the last line.
"""

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import train  # noqa: E402

WORDS = "a photo of cat dog horse car tree house red blue sky sea city street man woman flower night".split()


def captions(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]


def write_cache(data: Path, n: int, latent_shape, shard_size: int, rng: np.random.Generator, family="sd") -> list[str]:
    """A cache in train.py's format (latents-XXXXX.npy, captions-XXXXX.json, captions.txt, meta.json)."""
    data.mkdir(parents=True)
    caps = captions(n, rng)
    shards = range(0, n, shard_size)
    for k, lo in enumerate(shards):
        hi = min(n, lo + shard_size)
        np.save(data / f"latents-{k:05d}.npy", rng.standard_normal((hi - lo, *latent_shape)).astype(np.float16))
        (data / f"captions-{k:05d}.json").write_text(json.dumps(caps[lo:hi]))
    (data / "captions.txt").write_text("\n".join(caps) + "\n")
    meta = {
        "num_samples": n,
        "num_shards": len(shards),
        "latent_shape": list(latent_shape),
        "source": "synthetic",
        "teacher": "",
        "family": family,
        "resolution": latent_shape[-1] * 8,
    }
    (data / "meta.json").write_text(json.dumps(meta))
    return caps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# the step


def time_ours(args, teacher: Path, data: Path, out: Path, *extra: str) -> float:
    steps = args.warmup + args.steps
    argv = [
        "--teacher",
        str(teacher),
        "--student",
        args.student,
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--resolution",
        str(args.resolution),
        "--batch-size",
        str(args.batch_size),
        "--total-batch-size",
        str(args.batch_size),
        "--max-steps",
        str(steps),
        "--log-every",
        str(args.warmup),
        "--checkpoint-every",
        str(10**9),
        "--validate-every",
        "0",
        "--mixed-precision",
        args.mixed_precision,
        "--ema" if args.ema else "--no-ema",
        "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
        *extra,
    ]
    train.train(train.parse_args(argv))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # the first interval holds the warm-up; of the others the fastest, as for the bare step: on a shared
    # machine the slow intervals measure the neighbours
    return min(r["step_time"] for r in log if r["step"] > args.warmup)


def time_bare(args, teacher_path: Path, device: torch.device, latent_shape) -> float:
    from diffusers import DDPMScheduler

    cuda = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision) if cuda else None
    autocast = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
    torch.manual_seed(0)
    pipe, student, _ = train.load_models(str(teacher_path), args.student, None, dtype or torch.float32, device)
    teacher = pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=5e-5, weight_decay=1e-2, **({"fused": True} if cuda else {"foreach": True})
    )
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    B = args.batch_size
    latents = torch.randn(B, *latent_shape, device=device)
    with torch.no_grad(), autocast:  # encoder_hidden_states (+ SDXL's pooled text and time ids), once
        cond = train.encode_text(pipe, captions(B, np.random.default_rng(0)), args.resolution)
    T = noise_scheduler.config.num_train_timesteps

    def step():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, T, (B,), device=device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad(), autocast:
            teacher_pred = teacher(noisy_latents, timesteps, **cond).sample
        with autocast:
            model_pred = student(noisy_latents, timesteps, **cond).sample
        loss = F.mse_loss(model_pred.float(), teacher_pred.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    best = float("inf")
    for _ in range(args.steps // args.warmup):  # intervals of --warmup steps, like ours' log intervals
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / args.warmup)
    return best


# -----------------------------------------------------------------------------
# the loader


def time_loaders(args, tmp: Path) -> tuple[float, float]:
    """Samples per second: train.LatentCache + ShardedSampler vs torch.load of one .pt per sample."""
    rng = np.random.default_rng(0)
    n, B, shape = args.loader_samples, args.batch_size, (4, 64, 64)
    caps = write_cache(tmp / "cache", n, shape, shard_size=max(1, n // 2), rng=rng)
    cache = train.LatentCache(tmp / "cache")
    files = tmp / "per_file"
    files.mkdir()
    for i in range(n):
        torch.save(
            {"latents": torch.from_numpy(np.asarray(cache.get(np.array([i]))[0][0])), "text": caps[i]},
            files / f"{i}.pt",
        )
    sampler = train.ShardedSampler(n, B, rank=0, world_size=1, seed=0)
    batches = [sampler.batch(b) for b in range(n // B)]
    for i in range(n):  # warm the page cache for both sides
        (files / f"{i}.pt").read_bytes()
    cache.get(np.arange(n))

    def ours():
        for idx in batches:
            latents, text = cache.get(idx)

    def per_file():
        for idx in batches:
            items = [torch.load(files / f"{i}.pt", weights_only=True) for i in idx]
            torch.stack([x["latents"] for x in items]), [x["text"] for x in items]

    rates = []
    for fn in (ours, per_file):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rates.append(len(batches) * B / best)
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--teacher", default=None, help="a diffusers SD pipeline; default: built here (tiny, or --full-size)"
    )
    p.add_argument("--full-size", action="store_true", help="build SD v1.4's shapes with random weights (use a GPU)")
    p.add_argument("--sdxl", action="store_true", help="a tiny SDXL-shaped teacher (with --teacher: it is SDXL)")
    p.add_argument("--student", default=None, help="default: bk_base, or koala_700m with --sdxl")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 tiny, 64 full size")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 512 full size")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="bf16")
    p.add_argument("--gradient-checkpointing", action="store_true", help="in both steps")
    p.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=True, help="ours keeps its EMA (the paper's)"
    )
    p.add_argument("--warmup", type=int, default=10, help="steps before timing (also ours' log interval)")
    p.add_argument("--steps", type=int, default=30, help="timed steps (a multiple of --warmup)")
    p.add_argument("--rounds", type=int, default=3, help="ours then bare, this many times; the fastest of each")
    p.add_argument("--loader-samples", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON on the last line")
    args = p.parse_args()
    big = args.full_size or args.teacher is not None
    args.student = args.student or ("koala_700m" if args.sdxl else "bk_base")
    args.batch_size = args.batch_size or (64 if big else 8)
    args.resolution = args.resolution or (512 if big else 64)
    if args.steps % args.warmup:
        raise SystemExit("error: --steps must be a multiple of --warmup (ours is timed per log interval)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.teacher:
            teacher = Path(args.teacher)
        elif args.sdxl:
            from tiny_sdxl import make_tiny_sdxl

            teacher = make_tiny_sdxl(tmp / "teacher")
        else:
            from tiny_sd import make_tiny_sd

            teacher = make_tiny_sd(tmp / "teacher", full_size=args.full_size)
        latent_shape = (4, args.resolution // 8, args.resolution // 8)
        n = args.batch_size * (args.warmup + args.steps + 1)
        family = "sdxl" if args.sdxl else "sd"
        write_cache(tmp / "data", n, latent_shape, 4096, np.random.default_rng(0), family)
        # the same loop with the bare step's losses only: what the machinery around the step costs
        # (data, conditioning, tokens, text encoder, clipping, logging) without the method's extra work
        only_out = ("--lambda-feat", "0", "--no-ema")
        ours = ours_out = bare = float("inf")
        for r in range(args.rounds):
            ours = min(ours, time_ours(args, teacher, tmp / "data", tmp / f"out{r}"))
            ours_out = min(ours_out, time_ours(args, teacher, tmp / "data", tmp / f"out_only{r}", *only_out))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bare = min(bare, time_bare(args, teacher, device, latent_shape))
        ours_rate, file_rate = time_loaders(args, tmp)

    name = "SD v1.4 shapes" if args.full_size else (args.teacher or ("tiny SDXL" if args.sdxl else "tiny SD"))
    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": name,
        "student": args.student,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "mixed_precision": args.mixed_precision if device.type == "cuda" else "no",
        "ema": args.ema,
        "ours_step_s": ours,
        "bare_step_s": bare,
        "step_ratio": ours / bare,
        "ours_output_kd_only_step_s": ours_out,
        "step_ratio_output_kd_only": ours_out / bare,
        "ours_loader_samples_per_s": ours_rate,
        "per_file_loader_samples_per_s": file_rate,
        "loader_ratio": ours_rate / file_rate,
    }
    print(
        f"\n{name}, student {args.student}, batch {args.batch_size}, {args.resolution} px, {figures['device']}, "
        f"autocast {figures['mixed_precision']}"
    )
    print(f"{'our step (train.py)':28s}{ours * 1e3:>11.1f} ms")
    print(f"{'  same, output KD only':28s}{ours_out * 1e3:>11.1f} ms")
    print(f"{'bare step':28s}{bare * 1e3:>11.1f} ms")
    print(f"{'step ratio (target <= 1.10)':28s}{ours / bare:>13.3f}x")
    print(f"{'  output KD only':28s}{ours_out / bare:>13.3f}x")
    print(f"{'our loader':28s}{ours_rate:>9.0f} samples/s")
    print(f"{'torch.load per sample':28s}{file_rate:>9.0f} samples/s")
    print(f"{'loader ratio (target >= 10)':28s}{ours_rate / file_rate:>13.1f}x")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
