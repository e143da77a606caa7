"""
MNIST toy for random conditioning: a diffusion student learns to draw a digit it has never seen.

A class-conditional teacher UNet learns all ten digits. Two narrower students are distilled from it (output
and feature loss, randcond.py) on noised images without a single 3: one keeps each image's label, one uses
random conditioning (the label swapped for a random digit with probability p(t)). A CNN judge classifies what
each model draws. In contrast, a classifier distilled from the judge without 3s still recognises 3s.

    python toy_mnist.py                     # default preset; downloads MNIST to ./data/mnist
    python toy_mnist.py --data-dir DIR      # IDX files already on disk (.gz or raw)
    python toy_mnist.py --preset quick      # seconds on a CPU, numbers meaningless (the tests run it)
    python toy_mnist.py --images teacher    # image-free: students see teacher samples only

In --out: teacher and judge (reused unless --retrain), results.json, a grid per model, comparison.png.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

import randcond

T = 1000  # diffusion timesteps
FEATURE_LAYERS = ["down.0", "down.1", "down.2", "up.0", "up.1", "up.2"]  # named alike in teacher and students

# -----------------------------------------------------------------------------
# Noise schedule: abar_t = prod_{s<=t} (1 - beta_s), with DDPM's linear betas from 1e-4 to 0.02. Shape (T,).
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()


def add_noise(images: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    abar = ALPHAS_CUMPROD[timesteps].view(-1, 1, 1, 1)
    return abar.sqrt() * images + (1 - abar).sqrt() * noise


# -----------------------------------------------------------------------------
# Model: a small class-conditional UNet (teacher and students)
class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(math.gcd(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]  # + timestep and label embedding
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class UNet(nn.Module):
    """eps-prediction UNet on (timesteps, class labels); label num_classes is the null label. The image is folded
    to 4 x 14 x 14 (pixel_unshuffle, ~4x cheaper); levels 14, 7, 4; blocks down.i / mid / up.i pair up by name."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 64), num_classes: int = 10, emb_dim: int = 64):
        super().__init__()
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)  # + the learned null label
        self.conv_in = nn.Conv2d(4, widths[0], 3, padding=1)
        self.down = nn.ModuleList(ResBlock(c, w, emb_dim) for c, w in zip([widths[0], *widths[:-1]], widths))
        self.downsample = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.mid = ResBlock(widths[-1], widths[-1], emb_dim)
        rev = widths[::-1]
        self.up = nn.ModuleList(ResBlock(c + w, w, emb_dim) for c, w in zip([rev[0], *rev[:-1]], rev))  # + skip
        self.upsample = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for w in rev[:-1])
        self.norm_out = nn.GroupNorm(math.gcd(8, widths[0]), widths[0])
        self.conv_out = nn.Conv2d(widths[0], 4, 3, padding=1)

    def forward(self, noisy_latents: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        half = self.emb_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
        angles = timesteps.float()[:, None] * freqs[None]  # (B, half)
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], 1)) + self.label_emb(class_labels)  # (B, E)
        h = self.conv_in(F.pixel_unshuffle(noisy_latents, 2).contiguous(memory_format=torch.channels_last))  # 14 x 14
        skips = []
        for block, downsample in zip(self.down, [*self.downsample, nn.Identity()]):
            skips.append(block(h, emb))
            h = downsample(skips[-1])
        h = self.mid(h, emb)
        for block, upsample in zip(self.up, [*self.upsample, None]):
            skip = skips.pop()
            h = block(torch.cat([h[..., : skip.shape[-2], : skip.shape[-1]], skip], 1), emb)  # 8 -> 7 crop
            h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest")) if upsample else h
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)  # (B, 1, 28, 28)


# -----------------------------------------------------------------------------
# Sampler: deterministic DDIM with classifier-free guidance
@torch.no_grad()
def ddim_sample(model: nn.Module, labels: Tensor, noise: Tensor, steps: int, guidance: float, start=T - 1) -> Tensor:
    """DDIM (eta = 0) from x_start: pure noise at start = T-1, or an image noised to start. Returns (N, 1, 28, 28)
    in [-1, 1]. Guided eps = eps_null + w (eps_label - eps_null), null label 10; x0 clipped at every step."""
    model.eval()
    abar = torch.cat([ALPHAS_CUMPROD, torch.ones(1)]).to(noise.device)  # abar[-1] = 1: the clean image
    timesteps = torch.linspace(start, 0, steps).round().long().tolist()
    out = []
    for first in range(0, len(labels), 500):  # 500 samples at a time
        x, y = noise[first : first + 500], labels[first : first + 500]
        y2 = torch.cat([y, torch.full_like(y, 10)])
        for t, t_prev in zip(timesteps, [*timesteps[1:], -1]):
            eps_cond, eps_null = model(torch.cat([x, x]), torch.full_like(y2, t), y2).float().chunk(2)  # (N, 1, 28, 28)
            eps = eps_null + guidance * (eps_cond - eps_null)
            a_t, a_prev = abar[t], abar[t_prev]
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # consistent with the clipped x0
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        out.append(x)
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Training: the teacher learns to denoise; the students learn from it, with and without random conditioning
def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The lr factor at a step: a linear warm-up, then a cosine decay to 0 (short runs converge better with it)."""
    cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return (step + 1) / warmup if step < warmup else cosine


def train_teacher(cfg: argparse.Namespace, teacher: UNet, x: Tensor, y: Tensor) -> None:
    g, device = torch.Generator().manual_seed(cfg.seed), next(teacher.parameters()).device
    opt = torch.optim.AdamW(teacher.parameters(), lr=2e-3, weight_decay=0.0)
    # Schedule "none": no label is swapped, only the null drop (for classifier-free guidance) applies.
    null_drop = randcond.RandomConditioner(10, T, "none", null_condition=10)
    for step in tqdm(range(cfg.teacher_steps), desc="teacher", dynamic_ncols=True):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
        timesteps = torch.randint(0, T, (cfg.batch_size,), generator=g)
        noise = torch.randn(cfg.batch_size, 1, 28, 28, generator=g)
        labels, _ = null_drop(y[idx], timesteps, generator=g)
        noisy = add_noise(x[idx], noise, timesteps)
        model_pred = teacher.train()(noisy.to(device), timesteps.to(device), labels.to(device))
        loss = F.mse_loss(model_pred.float(), noise.to(device))  # the plain denoising loss
        opt.param_groups[0]["lr"] = 2e-3 * warmup_cosine(step, 50, cfg.teacher_steps)  # its only parameter group
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_students(cfg: argparse.Namespace, schedules: dict, teacher: UNet, x, y, on_step=None) -> dict:
    """One student per {name: (schedule, lam)}, all on the same batches, noise and timesteps; loss = lambda_out L_out
    + lambda_feat L_feat on labels that the schedule's p(t) swapped. on_step(step, students) runs after each step."""
    students, device = {}, next(teacher.parameters()).device
    for name, (schedule, lam) in schedules.items():
        torch.manual_seed(cfg.seed + 2)  # the same initial weights for every student
        unet = UNet(cfg.student_widths).to(device, memory_format=torch.channels_last)
        distiller = randcond.FeatureDistiller(teacher, unet, FEATURE_LAYERS)
        zeros = torch.zeros(2, dtype=torch.long, device=device)  # a probe batch: makes the 1x1 projections
        distiller.probe(torch.zeros(2, 1, 28, 28, device=device), zeros, zeros)  # student -> teacher widths
        opt = torch.optim.AdamW([*unet.parameters(), *distiller.parameters()], lr=4e-3, weight_decay=0.0)
        # The same conditioner seed for every student: randcond draws every coin (swap, pool index, null) for
        # every sample whatever the schedule, so the students see the same nulls and differ only in swaps.
        conditioner = randcond.RandomConditioner(10, T, schedule, lam, null_condition=10)
        g = torch.Generator().manual_seed(cfg.seed + 3)
        students[name] = SimpleNamespace(unet=unet, distiller=distiller, opt=opt, conditioner=conditioner, g=g)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    bar, losses = tqdm(range(cfg.student_steps), desc=f"{len(students)} students", dynamic_ncols=True), {}
    for step in bar:
        idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
        timesteps = torch.randint(0, T, (cfg.batch_size,), generator=g)
        noise = torch.randn(cfg.batch_size, 1, 28, 28, generator=g)
        noisy_latents, t = add_noise(x[idx], noise, timesteps).to(device), timesteps.to(device)  # (B, 1, 28, 28), (B,)
        for name, s in students.items():
            labels, _ = s.conditioner(y[idx].to(device), timesteps, generator=s.g)  # (B,): swaps, then null drops
            with s.distiller:  # hooks on teacher and this student, removed when the block ends
                with torch.no_grad():
                    teacher_pred = teacher(noisy_latents, t, labels)
                model_pred = s.unet.train()(noisy_latents, t, labels)
                loss_kd_out = randcond.output_kd_loss(model_pred, teacher_pred)
                loss_kd_feat = s.distiller.loss()
            loss = cfg.lambda_out * loss_kd_out + cfg.lambda_feat * loss_kd_feat
            s.opt.param_groups[0]["lr"] = 4e-3 * warmup_cosine(step, 50, cfg.student_steps)
            s.opt.zero_grad()
            loss.backward()
            s.opt.step()
            losses[name] = f"{loss_kd_out.item():.3f}/{loss_kd_feat.item():.3f}"  # loss_kd_out / loss_kd_feat
        bar.set_postfix(losses, refresh=False)
        if on_step:
            on_step(step + 1, {name: s.unet for name, s in students.items()})
    return {name: s.unet.eval().requires_grad_(False) for name, s in students.items()}


# -----------------------------------------------------------------------------
# Judge: a CNN classifier scores every model's samples; the same code distils a small one without the unseen digits
def classifier(w: int) -> nn.Sequential:
    return nn.Sequential(
        *(nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        *(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU()),
        *(nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * 49, 128), nn.ReLU(), nn.Linear(128, 10)),
    )


def train_classifier(model: nn.Module, x: Tensor, y: Tensor | None, steps: int, seed: int, teacher=None, temp=20.0):
    """Cross-entropy on labels y or, given a teacher, Hinton distillation: KL between the teacher's and the
    model's softmax at temperature temp, times temp^2 (a high temp carries "this 5 looks a bit like a 3")."""
    g, device = torch.Generator().manual_seed(seed), next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in tqdm(range(steps), desc="judge" if teacher is None else "classifier KD", dynamic_ncols=True):
        idx = torch.randint(len(x), (128,), generator=g)
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()  # one random shift per batch
        images = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3)).to(device)
        logits = model.train()(images)
        if teacher is None:
            loss = F.cross_entropy(logits, y[idx].to(device))
        else:
            with torch.no_grad():
                soft = F.softmax(teacher(images) / temp, 1)
            loss = F.kl_div(F.log_softmax(logits / temp, 1), soft, reduction="batchmean") * temp**2
        opt.param_groups[0]["lr"] = 2e-3 * warmup_cosine(step, 20, steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    device = next(model.parameters()).device
    pred = torch.cat([model(images[i : i + 1000].to(device)).argmax(1).cpu() for i in range(0, len(images), 1000)])
    return float((pred == labels).float().mean())


def judge_samples(cfg: argparse.Namespace, model: UNet, judge, digits: list[int]) -> tuple[Tensor, list[float]]:
    """samples_per_digit DDIM samples of each digit (the same noise for every model), the judge's accuracy."""
    n, device = cfg.samples_per_digit, next(model.parameters()).device
    noise = torch.randn(10, n, 1, 28, 28, generator=torch.Generator().manual_seed(cfg.seed + 6))[digits].flatten(0, 1)
    labels = torch.tensor(digits).repeat_interleave(n)  # (len(digits) n,), digit-major
    samples = ddim_sample(model, labels.to(device), noise.to(device), cfg.sample_steps, cfg.guidance)
    acc = [accuracy(judge, samples[i * n : (i + 1) * n].cpu(), torch.full((n,), d)) for i, d in enumerate(digits)]
    return samples.cpu(), acc


def evaluate(cfg: argparse.Namespace, models: dict, judge, out: Path) -> dict:
    """Per-digit accuracy of every model, its samples in samples_NAME.png (rows = digits), all in comparison.png."""
    results, grids = {}, {}
    for name, model in tqdm(models.items(), desc="sampling", dynamic_ncols=True):
        samples, acc = judge_samples(cfg, model, judge, list(range(10)))
        seen, unseen = [a for d, a in enumerate(acc) if d not in cfg.unseen], [acc[d] for d in cfg.unseen]
        results[name] = dict(params=sum(p.numel() for p in model.parameters()), per_class_accuracy=acc)
        results[name] |= dict(seen_mean=float(np.mean(seen)), unseen_mean=float(np.mean(unseen)))
        cells = ((samples.clamp(-1, 1) + 1) * 127.5).round().byte().view(10, -1, 28, 28)[:, :10]  # <= 10 a digit
        rows = F.pad(cells, (2, 0, 2, 0)).permute(0, 2, 1, 3).flatten(2).flatten(0, 1)  # (10 * 30, columns * 30)
        grids[name] = Image.fromarray(F.pad(rows, (0, 2, 0, 2)).numpy())  # one row per digit, 2 px apart
        grids[name].save(out / f"samples_{name}.png")
    # The README figure: a column per model, a row per digit (labelled on the left), the unseen digits in red.
    (w, h), left, top = grids["teacher"].size, 60, 50
    fig = Image.new("RGB", (left + len(grids) * (w + 10), h + top + 10), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((10, 4), "rows: digits 0-9 (red: never seen by the students); columns: one model each", fill="black")
    for d in range(10):
        label, colour = (f"{d} unseen", "red") if d in cfg.unseen else (str(d), "black")
        draw.text((10, top + (d + 0.5) * h / 10 - 6), label, fill=colour)
    for i, (name, m) in enumerate(results.items()):
        x0 = left + i * (w + 10)
        fig.paste(grids[name], (x0, top))
        draw.text((x0, 20), name.replace("_", " ").replace("rc", "RC"), fill="black")
        draw.text((x0, 33), f"unseen {m['unseen_mean']:.2f} / seen {m['seen_mean']:.2f}", fill="black")
        for d in cfg.unseen:
            draw.rectangle((x0, top + d * h / 10, x0 + w - 1, top + (d + 1) * h / 10 - 1), outline="red", width=2)
    fig.save(out / "comparison.png")
    return results


# -----------------------------------------------------------------------------
# Data and I/O. Flags: one flat block; --preset quick makes the models tiny and the runs short (seconds)
QUICK = dict(teacher_widths=[8, 16, 16], student_widths=[4, 8, 8], batch_size=64, samples_per_digit=4, sample_steps=5)
QUICK |= dict(teacher_steps=60, judge_steps=60, classifier_steps=40, student_steps=40, teacher_images=64)
QUICK_NOTE = "--preset quick trains tiny models for a few steps to exercise the code: its accuracies mean nothing"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 1, like every other bad input
        raise SystemExit(f"error: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=["default", "quick"], default="default", help="quick: tiny and fast, for tests")
    p.add_argument("--data-dir", default="./data/mnist", help="MNIST IDX files (.gz or raw); downloaded when missing")
    p.add_argument("--out", default="./runs/mnist", help="checkpoints, figures and results.json")
    p.add_argument("--unseen", type=int, nargs="+", default=[3], help="digits the students never see")
    p.add_argument("--images", choices=["real", "teacher"], default="real", help="real, or the teacher's samples")
    p.add_argument("--retrain", action="store_true", help="retrain teacher and judge even if saved in --out")
    p.add_argument("--seed", type=int, default=0, help="seeds data order, noise and initial weights")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda, mps or cpu")
    p.add_argument("--threads", type=int, default=0, help="0: all cores, best if idle; 1 when other jobs share the CPU")
    # sampling: DDIM with classifier-free guidance; the judge scores samples-per-digit samples of every digit
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--samples-per-digit", type=int, default=100, help="samples the judge scores per digit and model")
    # training: teacher, judge, the classifier distilled from the judge, students (randcond's null-label rate, 0.1)
    p.add_argument("--teacher-steps", type=int, default=1500, help="teacher training steps")
    p.add_argument("--student-steps", type=int, default=2400, help="training steps of each student")
    p.add_argument("--batch-size", type=int, default=128, help="teacher and students")
    p.add_argument("--rc-schedule", choices=randcond.SCHEDULES, default="exp", help="p(t) of the RC student")
    lam = "lambda of p(t) for exp and two_sided (default 2; published 5), the probability for constant"
    p.add_argument("--rc-lambda", type=float, default=argparse.SUPPRESS, help=lam)  # absent from args unless given
    # fixed settings (the quick preset shrinks them): UNet widths per level, loss weights, ...
    p.set_defaults(teacher_widths=[24, 48, 48], student_widths=[12, 24, 24], judge_steps=600, classifier_steps=1500)
    p.set_defaults(lambda_out=1.0, lambda_feat=1.0, teacher_images=4096)
    p.set_defaults(**QUICK if p.parse_args(argv).preset == "quick" else {})
    args = p.parse_args(argv)
    # A bad value ends in one `error:` line (0 steps would save an untrained model as if it were trained).
    for name in ["sample_steps", "samples_per_digit", "teacher_steps", "student_steps", "batch_size", "threads"]:
        least = 0 if name == "threads" else 1
        if getattr(args, name) < least:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    for name, available in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())):
        if args.device == name and not available:
            raise SystemExit(f"error: --device {name}: this torch cannot use it on this machine; use --device cpu")
    if not all(0 <= u <= 9 for u in args.unseen) or len(set(args.unseen)) == 10:
        raise SystemExit("error: --unseen takes digits 0-9 and must leave at least one digit seen")
    ignores_lambda = torch.equal(*(randcond.replace_prob(torch.arange(T), T, args.rc_schedule, v) for v in (0, 1)))
    if ignores_lambda and "rc_lambda" in args:  # the same p(t) at any lambda: a value given is a mistake
        raise SystemExit(f"error: --rc-schedule {args.rc_schedule} does not read --rc-lambda; leave it out")
    args.rc_lambda = None if ignores_lambda else getattr(args, "rc_lambda", 2.0)
    try:
        randcond.replace_prob(torch.zeros(1, dtype=torch.long), T, args.rc_schedule, args.rc_lambda)
    except ValueError as e:
        raise SystemExit(f"error: --rc-schedule {args.rc_schedule} --rc-lambda {args.rc_lambda:g}: {e}") from None
    return args


# MNIST: the IDX files, MD5-checked, downloaded when missing
MNIST_MD5 = {  # of the official .gz files
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
}
MNIST_URLS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"]


def read_idx(data_dir: Path, name: str) -> np.ndarray | None:
    """name.gz (MD5-checked) or the raw file; None when neither is there. IDX: 2 zero bytes, dtype 0x08 (uint8),
    the number of dims, their sizes (big-endian int32), then the bytes."""
    gz, raw = data_dir / f"{name}.gz", data_dir / name
    if gz.exists() and hashlib.md5(gz.read_bytes()).hexdigest() != MNIST_MD5[name]:
        raise SystemExit(f"error: {gz} fails its MD5 check (expected {MNIST_MD5[name]}); delete it to re-download")
    if not gz.exists() and not raw.exists():
        return None
    data = gzip.decompress(gz.read_bytes()) if gz.exists() else raw.read_bytes()
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])) if len(data) > 3 else ()
    if data[:3] != b"\x00\x00\x08" or not shape or len(data) != 4 + 4 * len(shape) + math.prod(shape):
        raise SystemExit(f"error: {gz if gz.exists() else raw}: not an unsigned-byte IDX file, or truncated")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * len(shape)).reshape(shape)


def download(data_dir: Path, name: str) -> int:
    """name.gz from the first source that serves the right MD5."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for url in MNIST_URLS:
        try:
            with urllib.request.urlopen(f"{url}{name}.gz", timeout=20) as r:
                data = r.read()
            if hashlib.md5(data).hexdigest() == MNIST_MD5[name]:
                return (data_dir / f"{name}.gz").write_bytes(data)  # a cut-off write fails the MD5 check later
            error = f"{url}: MD5 mismatch"
        except OSError as e:
            error = f"{url}: {e}"
    raise SystemExit(f"error: MNIST is not in {data_dir} and could not be downloaded ({error}); pass --data-dir DIR")


def load_mnist(data_dir: str | Path, seed: int = 0) -> dict:
    """Images (N, 1, 28, 28) in [-1, 1] and labels (N,): the 60k train split trains, the 10k test split
    judges. With only the test split on disk, it is split in two (8,000 train / 2,000 held out)."""
    data_dir, splits = Path(data_dir), {}
    if read_idx(data_dir, "t10k-images-idx3-ubyte") is None or read_idx(data_dir, "t10k-labels-idx1-ubyte") is None:
        for name in (name for name in MNIST_MD5 if read_idx(data_dir, name) is None):
            download(data_dir, name)
    for split in ("t10k", "train"):
        images, labels = (read_idx(data_dir, f"{split}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
        if images is None or labels is None:
            continue
        if not len(labels) or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise SystemExit(f"error: {data_dir}: {split} images {images.shape} do not match labels {labels.shape}")
        if labels.max() > 9:
            raise SystemExit(f"error: {data_dir}: {split} labels hold {labels.max()}; MNIST labels are 0-9")
        x = torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1)
        splits[split] = x, torch.from_numpy(labels.astype(np.int64))
    (x, y), train = splits["t10k"], splits.get("train")
    if train is not None:
        return dict(x_train=train[0], y_train=train[1], x_heldout=x, y_heldout=y, split=False)
    held, train = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).split([2000, len(x) - 2000])
    return dict(x_train=x[train], y_train=y[train], x_heldout=x[held], y_heldout=y[held], split=True)


# Checkpoints: teacher and judge, reused by later runs
def sha256(state: dict[str, Tensor]) -> str:
    return hashlib.sha256(b"".join(k.encode() + state[k].numpy().tobytes() for k in sorted(state))).hexdigest()


def load_or_train(path: Path, settings: dict, model: nn.Module, train, retrain: bool) -> nn.Module:
    """Load path into model if its settings match and its checksum verifies, else train(model) and save it with both
    (safetensors metadata). A damaged file is retrained, saying so, rather than loaded as a silently worse model."""
    if path.exists() and not retrain:
        try:
            state, saved = load_file(str(path)), safe_open(str(path), "pt").metadata()
            verified = saved["sha256"] == sha256(state)
        except Exception:  # truncated, not safetensors, no checksum: none of them can be trusted
            verified = False
        if verified and json.loads(saved["settings"]) == json.loads(json.dumps(settings)):
            model.load_state_dict(state)
            return model.eval().requires_grad_(False)
        print(f"{path}: {'saved with other settings' if verified else 'damaged (checksum or format)'}, retraining it")
    train(model)
    state, tmp = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"settings": json.dumps(settings), "sha256": sha256(state)})
    os.replace(tmp, path)  # never a half-written file under the real name
    return model.eval().requires_grad_(False)


def teacher_and_judge(cfg: argparse.Namespace, data: dict, device: torch.device, out: Path) -> tuple[UNet, nn.Module]:
    """Both trained on all ten digits, or loaded from --out when saved with the same settings."""
    x, y, sig = data["x_train"], data["y_train"], dict(train=len(data["x_train"]), split=data["split"], seed=cfg.seed)
    teacher = UNet(cfg.teacher_widths).to(device, memory_format=torch.channels_last)
    sig_teacher = dict(widths=cfg.teacher_widths, steps=cfg.teacher_steps, batch=cfg.batch_size, **sig)
    load_or_train(out / "teacher.safetensors", sig_teacher, teacher, lambda m: train_teacher(cfg, m, x, y), cfg.retrain)
    judge, train = classifier(16).to(device), lambda m: train_classifier(m, x, y, cfg.judge_steps, cfg.seed)
    load_or_train(out / "judge.safetensors", dict(steps=cfg.judge_steps, **sig), judge, train, cfg.retrain)
    return teacher, judge


# -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device, out = torch.device(auto if cfg.device == "auto" else cfg.device), Path(cfg.out)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = [time.perf_counter()]
    data = load_mnist(cfg.data_dir, cfg.seed)
    x, y = data["x_train"], data["y_train"]
    print(f"{device}, {torch.get_num_threads()} threads; {len(x)} training, {len(data['x_heldout'])} held-out images")
    clock.append(time.perf_counter())

    teacher, judge = teacher_and_judge(cfg, data, device, out)
    clock.append(time.perf_counter())
    # The contrast: a classifier distilled from the judge on images without the unseen digits still knows them.
    seen, held = ~torch.isin(y, torch.tensor(cfg.unseen)), torch.isin(data["y_heldout"], torch.tensor(cfg.unseen))
    small = train_classifier(classifier(8).to(device), x[seen], None, cfg.classifier_steps, cfg.seed + 5, judge)
    classifier_acc = accuracy(small, data["x_heldout"][held], data["y_heldout"][held])
    clock.append(time.perf_counter())
    x_seen, y_seen = x[seen], y[seen]  # the students' images: seen digits, real or drawn by the teacher
    if cfg.images == "teacher":
        digits = torch.tensor([d for d in range(10) if d not in cfg.unseen])
        y_seen = digits[torch.arange(cfg.teacher_images) % len(digits)]
        noise = torch.randn(cfg.teacher_images, 1, 28, 28, generator=torch.Generator().manual_seed(cfg.seed + 4))
        x_seen = ddim_sample(teacher, y_seen.to(device), noise.to(device), cfg.sample_steps, cfg.guidance).cpu()
    schedules = {"student_no_rc": ("none", 0.0), "student_rc": (cfg.rc_schedule, cfg.rc_lambda)}
    students = train_students(cfg, schedules, teacher, x_seen, y_seen)
    clock.append(time.perf_counter())
    models = evaluate(cfg, {"teacher": teacher, **students}, judge, out)
    clock.append(time.perf_counter())

    phases = ("data", "teacher and judge", "classifier", "students", "sampling")
    timings = {k: round(b - a, 1) for k, a, b in zip(phases, clock, clock[1:])}
    timings["total"] = round(clock[-1] - clock[0], 1)
    report = dict(note=QUICK_NOTE if cfg.preset == "quick" else None, config=vars(cfg), unseen=list(cfg.unseen))
    report |= dict(device=str(device), threads=torch.get_num_threads(), timings_s=timings)
    sizes = dict(train=len(x), heldout=len(data["x_heldout"]), students=len(x_seen), test_split_only=data["split"])
    judge_acc = accuracy(judge, data["x_heldout"], data["y_heldout"])
    report |= dict(data=sizes, judge_heldout_accuracy=judge_acc, classifier_unseen_accuracy=classifier_acc)
    report |= dict(models=models)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'model':<14}{'params':>8} " + "".join(f"{d:>5}" for d in range(10)) + "   seen  unseen")
    for name, m in models.items():
        accs = "".join(f"{a:>5.2f}" for a in m["per_class_accuracy"])
        print(f"{name:<14}{m['params']:>8,} {accs}{m['seen_mean']:>7.2f}{m['unseen_mean']:>8.2f}")
    print(f"judge {judge_acc:.3f} on held-out digits; classifier distilled without {cfg.unseen}: {classifier_acc:.2f}")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if cfg.preset == "quick":
        print(f"note: {QUICK_NOTE}")
    return report


if __name__ == "__main__":
    main()
