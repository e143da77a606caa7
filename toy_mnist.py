"""
MNIST toy for random conditioning: watch a diffusion student generate a digit it has never seen.

A class-conditional teacher UNet learns all ten digits. Two narrower students are distilled from it
(output + feature loss, randcond.py) on noised images that contain no image of the unseen digit (3):
one keeps each image's own label, one uses random conditioning (labels swapped for a random digit
with probability p(t)). A CNN judge then classifies what each model generates for every digit. For
contrast, a small classifier distilled from the judge's soft labels on the same images still
recognises the unseen digit: classification transfers "dark knowledge", diffusion needs RC.

    python toy_mnist.py                                  # default preset (downloads MNIST to ./data/mnist)
    python toy_mnist.py --data-dir DIR                   # use IDX files already on disk
    python toy_mnist.py --preset quick                   # well under a minute on a CPU (the tests run it)
    python toy_mnist.py --ablate                         # students for every p(t) schedule, one table
    python toy_mnist.py --images teacher                 # image-free: students see teacher samples only

Teacher and judge are saved in --out (safetensors) and reused unless --retrain; results.json, one PNG
grid per model (rows = digits) and a side-by-side figure land there too.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

import randcond

# -----------------------------------------------------------------------------
# Config: one dataclass, two presets, flags override either


@dataclass
class Config:
    data_dir: str = "./data/mnist"
    out: str = "./runs/mnist"
    unseen: list[int] = field(default_factory=lambda: [3])
    images: str = "real"  # real | teacher: what the students are trained on
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    retrain: bool = False
    ablate: bool = False
    # diffusion
    num_train_timesteps: int = 1000
    null_prob: float = 0.1
    sample_steps: int = 25
    guidance: float = 5.0
    samples_per_digit: int = 100
    # teacher: widths per level on a 14x14 grid (the 28x28 image folded 2x2 into 4 channels)
    teacher_widths: tuple[int, ...] = (24, 48, 48)
    teacher_steps: int = 1500
    teacher_lr: float = 2e-3
    # judge and the classifier-distillation contrast
    judge_width: int = 16
    judge_steps: int = 600
    classifier_steps: int = 1500
    kd_temperature: float = 20.0  # high T carries the judge's "this 5 looks a bit like a 3" (Hinton et al.)
    # students
    student_widths: tuple[int, ...] = (12, 24, 24)
    student_steps: int = 1600
    student_lr: float = 4e-3
    batch_size: int = 128
    rc_schedule: str = "exp"
    rc_lambda: float = 2.0  # published: 5; 2 learns the unseen digit in far fewer steps (see --ablate)
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    feature_layers: tuple[str, ...] = ("down.0", "down.1", "down.2", "up.0", "up.1", "up.2")
    teacher_images: int = 4096  # --images teacher: how many seen-digit samples the teacher makes


PRESETS = {
    "default": {},
    # Tiny models and few steps: exercises every phase end to end in seconds (numbers are meaningless).
    "quick": dict(
        teacher_widths=(8, 16, 16),
        student_widths=(4, 8, 8),
        teacher_steps=60,
        judge_steps=60,
        classifier_steps=40,
        student_steps=40,
        batch_size=64,
        samples_per_digit=4,
        sample_steps=5,
        teacher_images=64,
    ),
}

ABLATION = [
    ("none", 0.0),
    ("exp", 2.0),
    ("exp", 5.0),
    ("exp", 10.0),
    ("sigmoid", 0.0),
    ("two_sided", 5.0),
    ("constant", 1.0),
]


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    # data and output
    p.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="folder with the MNIST IDX files (.gz or raw); downloaded there when missing",
    )
    p.add_argument("--out", default=d.out, help="checkpoints, figures and results.json")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="default: the README's run; quick: tiny models and few steps, for tests",
    )
    p.add_argument("--unseen", type=int, nargs="+", default=d.unseen, help="digits the students never see")
    p.add_argument(
        "--images",
        choices=["real", "teacher"],
        default=d.images,
        help="students' training images: real digits, or teacher samples of the seen digits",
    )
    p.add_argument("--retrain", action="store_true", help="retrain teacher and judge even if saved")
    p.add_argument("--ablate", action="store_true", help="also train students for every p(t) schedule")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds data order, noise and initial weights")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | mps")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads (0: torch's default); 1 is faster on a CPU that other jobs keep busy",
    )
    # the method (defaults as published, see randcond.py)
    p.add_argument("--rc-schedule", default=d.rc_schedule, choices=randcond.SCHEDULES, help="p(t) of the RC student")
    p.add_argument("--rc-lambda", type=float, default=d.rc_lambda, help="lambda of p(t) (constant: p itself)")
    p.add_argument("--lambda-out", type=float, default=d.lambda_out, help="weight of the output KD loss")
    p.add_argument("--lambda-feat", type=float, default=d.lambda_feat, help="weight of the feature KD loss")
    # sizes and steps: left out, the preset's value (default preset in brackets)
    p.add_argument("--teacher-steps", default=argparse.SUPPRESS, type=int, help=f"[{d.teacher_steps}]")
    p.add_argument("--student-steps", default=argparse.SUPPRESS, type=int, help=f"[{d.student_steps}]")
    p.add_argument("--batch-size", default=argparse.SUPPRESS, type=int, help=f"[{d.batch_size}]")
    p.add_argument(
        "--samples-per-digit",
        default=argparse.SUPPRESS,
        type=int,
        help=f"samples the judge scores per digit [{d.samples_per_digit}]",
    )
    p.add_argument("--sample-steps", default=argparse.SUPPRESS, type=int, help=f"DDIM steps [{d.sample_steps}]")
    p.add_argument(
        "--guidance", default=argparse.SUPPRESS, type=float, help=f"classifier-free guidance scale [{d.guidance:g}]"
    )
    args = p.parse_args(argv)

    cfg = replace(d, **PRESETS[args.preset])
    for k, v in vars(args).items():
        if k != "preset" and hasattr(cfg, k):
            setattr(cfg, k, v)
    if not all(0 <= u <= 9 for u in cfg.unseen) or len(set(cfg.unseen)) == 10:
        p.error("--unseen takes digits 0-9 and must leave at least one digit seen")
    try:
        randcond.replace_prob(torch.zeros(1, dtype=torch.long), cfg.num_train_timesteps, cfg.rc_schedule, cfg.rc_lambda)
    except ValueError as e:
        p.error(str(e))
    return cfg


# -----------------------------------------------------------------------------
# Data: the MNIST IDX files, MD5-checked, downloaded when missing

MNIST_FILES = {  # name -> MD5 of the official .gz; the test split first (enough on its own)
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
}
MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
HELDOUT_WHEN_TEST_ONLY = 2000


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_idx(data: bytes, name: str = "IDX data") -> np.ndarray:
    """IDX format: 2 zero bytes, dtype code 0x08 (uint8), number of dims, then big-endian int32 sizes."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise ValueError(f"{name}: not an unsigned-byte IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) != offset + math.prod(shape):
        raise ValueError(f"{name}: header says {shape} ({math.prod(shape)} bytes) but {len(data) - offset} follow")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def find_idx(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.exists():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read a .gz (MD5-checked against the official file) or raw IDX file."""
    if path.suffix == ".gz":
        name = path.name[:-3]
        if name in MNIST_FILES and md5sum(path) != MNIST_FILES[name]:
            raise SystemExit(
                f"error: {path} fails its MD5 check (expected {MNIST_FILES[name]}); delete it to re-download"
            )
        data = gzip.decompress(path.read_bytes())
    else:
        data = path.read_bytes()
    try:
        return parse_idx(data, str(path))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def download(name: str, data_dir: Path, timeout: float = 20) -> Path:
    """Fetch name.gz from the first mirror that answers with the right MD5; atomic (tmp then rename)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    dest = data_dir / f"{name}.gz"
    errors = []
    for mirror in MNIST_MIRRORS:
        tmp = dest.with_suffix(".gz.part")
        try:
            with urllib.request.urlopen(mirror + dest.name, timeout=timeout) as r, open(tmp, "wb") as f:
                f.write(r.read())
            if md5sum(tmp) != MNIST_FILES[name]:
                raise OSError("MD5 mismatch")
            os.replace(tmp, dest)
            return dest
        except OSError as e:
            errors.append(f"{mirror}: {e}")
            tmp.unlink(missing_ok=True)
    raise SystemExit(
        f"error: MNIST is not in {data_dir} and could not be downloaded ({errors[-1]}); "
        f"pass --data-dir DIR with the IDX files (train-images-idx3-ubyte.gz, ...)"
    )


def load_mnist(data_dir: str | Path, seed: int = 0) -> dict[str, Tensor]:
    """Returns train/heldout images (N, 1, 28, 28) in [-1, 1] and labels (N,).

    The 60k train split trains and the 10k test split judges; with only the test split on disk it is
    split deterministically (8,000 train / 2,000 held out). Missing files are downloaded (test split
    first, so a folder holding only it is used as it is)."""
    data_dir = Path(data_dir)
    paths = {name: find_idx(data_dir, name) for name in MNIST_FILES}
    test = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if any(paths[n] is None for n in test):
        paths = {n: paths[n] or download(n, data_dir) for n in MNIST_FILES}
    arrays = {n: read_idx(p) for n, p in paths.items() if p is not None}

    def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        if len(images) != len(labels) or images.shape[1:] != (28, 28):
            raise SystemExit(f"error: {data_dir}: {len(images)} images of {images.shape[1:]} vs {len(labels)} labels")
        x = torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
        return x, torch.from_numpy(labels.astype(np.int64))

    x_test, y_test = to_tensors(arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"])
    if "train-images-idx3-ubyte" in arrays and "train-labels-idx1-ubyte" in arrays:
        x_train, y_train = to_tensors(arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
        return {"x_train": x_train, "y_train": y_train, "x_heldout": x_test, "y_heldout": y_test, "split": False}
    perm = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(seed))
    held, train = perm[:HELDOUT_WHEN_TEST_ONLY], perm[HELDOUT_WHEN_TEST_ONLY:]
    return {
        "x_train": x_test[train],
        "y_train": y_test[train],
        "x_heldout": x_test[held],
        "y_heldout": y_test[held],
        "split": True,
    }


def without_digits(x: Tensor, y: Tensor, digits: list[int]) -> tuple[Tensor, Tensor]:
    keep = ~torch.isin(y, torch.tensor(digits))
    return x[keep], y[keep]


# -----------------------------------------------------------------------------
# Models: a small class-conditional UNet (teacher and students) and a CNN judge


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
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]  # timestep + label, broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """eps-prediction UNet conditioned on (timesteps, class labels); label num_classes is the null label.

    The 28x28 image is folded into 4 channels at 14x14 (pixel_unshuffle) before the first block: on a
    CPU this is ~4x cheaper than working at 28x28 and MNIST strokes survive it. Levels: 14, 7, 4.
    Blocks are named down.i / mid / up.i in both teacher and student so features pair up by name."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 64), num_classes: int = 10, emb_dim: int = 64):
        super().__init__()
        self.num_classes, self.emb_dim = num_classes, emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)  # + the learned null label
        self.conv_in = nn.Conv2d(4, widths[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock(c, w, emb_dim))
            c = w
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.mid = ResBlock(c, c, emb_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(ResBlock(c + widths[i], widths[i], emb_dim))
            c = widths[i]
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(math.gcd(8, c), c)
        self.conv_out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, noisy_latents: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        half = self.emb_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device) / half)
        angles = timesteps.float()[:, None] * freqs[None]  # (B, half)
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], 1)) + self.label_emb(class_labels)  # (B, E)
        h = F.pixel_unshuffle(noisy_latents, 2).contiguous(memory_format=torch.channels_last)  # (B, 4, 14, 14)
        h = self.conv_in(h)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            skip = skips.pop()
            h = block(torch.cat([h[..., : skip.shape[-2], : skip.shape[-1]], skip], 1), emb)  # 8 -> 7 crop
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)  # (B, 1, 28, 28)


class Classifier(nn.Module):
    """The judge (width 16) and the classifier-distillation contrast (width 8)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(2 * w * 49, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Diffusion: DDPM noise schedule, forward noising, deterministic DDIM sampling with guidance


def ddpm_schedule(T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02) -> Tensor:
    """alphas_cumprod[t] = prod_{s<=t} (1 - beta_s), linear betas as in DDPM. Shape (T,)."""
    return torch.cumprod(1 - torch.linspace(beta_1, beta_T, T, dtype=torch.float64), 0).float()


def add_noise(images: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    abar = alphas_cumprod.to(images.device)[timesteps].view(-1, 1, 1, 1)
    return abar.sqrt() * images + (1 - abar).sqrt() * noise


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    labels: Tensor,
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int = 25,
    guidance: float = 3.0,
    null_label: int = 10,
    batch_size: int = 500,
) -> Tensor:
    """DDIM (eta = 0) from the given noise; guided eps = eps_null + w (eps_label - eps_null).
    x0 is clipped to [-1, 1] at every step. Returns images (N, 1, 28, 28) in [-1, 1]."""
    model.eval()
    abar = alphas_cumprod.to(noise.device)
    T = len(abar)
    timesteps = torch.linspace(T - 1, 0, steps).round().long().tolist()
    out = []
    for start in range(0, len(labels), batch_size):
        x = noise[start : start + batch_size]
        y = labels[start : start + batch_size]
        y2 = torch.cat([y, torch.full_like(y, null_label)])
        for i, t in enumerate(timesteps):
            tt = torch.full((2 * len(y),), t, device=x.device, dtype=torch.long)
            eps_cond, eps_null = model(torch.cat([x, x]), tt, y2).float().chunk(2)
            eps = eps_null + guidance * (eps_cond - eps_null)
            a_t = abar[t]
            a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, device=x.device)
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # consistent with the clipped x0
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        out.append(x)
    return torch.cat(out)


# -----------------------------------------------------------------------------
# Training loops


def lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 0: short runs converge better than at a constant rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_teacher(cfg: Config, x: Tensor, y: Tensor, device: torch.device, alphas_cumprod: Tensor) -> UNet:
    """Plain denoising on all ten digits; labels dropped to the null label 10% of the time (CFG)."""
    g = torch.Generator().manual_seed(cfg.seed)
    teacher = UNet(cfg.teacher_widths).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr, weight_decay=0.0)
    # No swapping (schedule "none"): the conditioner only applies the null drop, as published.
    null_drop = randcond.RandomConditioner(
        10, cfg.num_train_timesteps, "none", null_prob=cfg.null_prob, null_condition=10
    )
    teacher.train()
    for step in tqdm(range(cfg.teacher_steps), desc="teacher", dynamic_ncols=True):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
        timesteps = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn(cfg.batch_size, 1, 28, 28, generator=g)
        labels, _ = null_drop(y[idx], timesteps, generator=g)
        noisy = add_noise(x[idx], noise, timesteps, alphas_cumprod)
        model_pred = teacher(noisy.to(device), timesteps.to(device), labels.to(device))
        loss = F.mse_loss(model_pred.float(), noise.to(device))
        set_lr(opt, lr_at(step, cfg.teacher_steps, cfg.teacher_lr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return teacher.eval().requires_grad_(False)


def shift_augment(images: Tensor, g: torch.Generator, max_shift: int = 2) -> Tensor:
    """Random translation by up to max_shift pixels (one shift per batch: cheap, enough for MNIST)."""
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=g)).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(2, 3))


def train_classifier(
    x: Tensor,
    y: Tensor | None,
    steps: int,
    device: torch.device,
    seed: int,
    width: int = 32,
    teacher: Classifier | None = None,
    temperature: float = 4.0,
    desc: str = "judge",
) -> Classifier:
    """Cross-entropy on labels y, or (teacher given) Hinton distillation: KL between the teacher's and
    the student's softmax at temperature T, times T^2."""
    g = torch.Generator().manual_seed(seed)
    model = Classifier(width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for step in tqdm(range(steps), desc=desc, dynamic_ncols=True):
        idx = torch.randint(len(x), (128,), generator=g)
        images = shift_augment(x[idx], g).to(device)
        logits = model(images)
        if teacher is None:
            loss = F.cross_entropy(logits, y[idx].to(device))
        else:
            with torch.no_grad():
                teacher_logits = teacher(images)
            if math.isinf(temperature):  # the high-temperature limit: match logits (Caruana / Hinton)
                loss = F.mse_loss(logits, teacher_logits)
            else:
                soft = F.softmax(teacher_logits / temperature, 1)
                loss = F.kl_div(F.log_softmax(logits / temperature, 1), soft, reduction="batchmean") * temperature**2
        set_lr(opt, lr_at(step, steps, 2e-3, warmup=20))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classify(model: Classifier, images: Tensor, device: torch.device, batch_size: int = 1000) -> Tensor:
    return torch.cat(
        [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )


@dataclass
class Arm:
    """One student and how it picks its training labels."""

    name: str
    schedule: str
    lam: float
    # built by train_students
    student: UNet | None = None
    distiller: randcond.FeatureDistiller | None = None  # its parameters() are the 1x1 projections
    opt: torch.optim.Optimizer | None = None
    conditioner: randcond.RandomConditioner | None = None
    generator: torch.Generator | None = None
    seconds: float = 0.0  # wall time of this arm's steps (teacher forward included)


def train_students(
    cfg: Config, arms: list[Arm], teacher: UNet, x: Tensor, y: Tensor, device: torch.device, alphas_cumprod: Tensor
) -> None:
    """Distil the teacher into every arm's student on the same noised images, timesteps and null drops.

    Every arm's conditioner has a generator with the same seed: since randcond draws the swap coin,
    the pool draw and the null coin for every sample whatever the schedule, all arms drop the same
    samples to the null label, and an RC arm differs from the no-RC arm exactly where it swapped."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for arm in arms:
        torch.manual_seed(cfg.seed + 2)  # same initial weights for every student
        arm.student = UNet(cfg.student_widths).to(device, memory_format=torch.channels_last)
        arm.distiller = randcond.FeatureDistiller(teacher, arm.student, list(cfg.feature_layers))
        probe = (
            torch.zeros(2, 1, 28, 28, device=device),
            torch.zeros(2, dtype=torch.long, device=device),
            torch.zeros(2, dtype=torch.long, device=device),
        )
        arm.distiller.probe(*probe)  # creates the 1x1 projections (student -> teacher widths)
        arm.opt = torch.optim.AdamW(
            list(arm.student.parameters()) + list(arm.distiller.parameters()), lr=cfg.student_lr, weight_decay=0.0
        )
        arm.conditioner = randcond.RandomConditioner(
            10, cfg.num_train_timesteps, arm.schedule, arm.lam, null_prob=cfg.null_prob, null_condition=10
        )
        arm.generator = torch.Generator().manual_seed(cfg.seed + 3)
        arm.student.train()
    bar = tqdm(range(cfg.student_steps), desc=f"{len(arms)} students", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
        timesteps = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        noise = torch.randn(cfg.batch_size, 1, 28, 28, generator=g)
        noisy_latents = add_noise(x[idx], noise, timesteps, alphas_cumprod).to(device)
        timesteps_d = timesteps.to(device)
        logs = {}
        for arm in arms:
            t0 = time.perf_counter()
            labels, _ = arm.conditioner(y[idx], timesteps, generator=arm.generator)  # (B,), swaps then null drops
            labels = labels.to(device)
            with arm.distiller:  # hooks on teacher and this student, removed at the end of the block
                with torch.no_grad():
                    teacher_pred = teacher(noisy_latents, timesteps_d, labels)
                model_pred = arm.student(noisy_latents, timesteps_d, labels)
                loss_kd_out = randcond.output_kd_loss(model_pred, teacher_pred)
                loss_kd_feat = arm.distiller.loss()
            loss = cfg.lambda_out * loss_kd_out + cfg.lambda_feat * loss_kd_feat
            set_lr(arm.opt, lr_at(step, cfg.student_steps, cfg.student_lr))
            arm.opt.zero_grad(set_to_none=True)
            loss.backward()
            arm.opt.step()
            arm.seconds += time.perf_counter() - t0
            short = arm.name.removeprefix("student_").removeprefix("ablate_")
            logs[short] = f"{loss_kd_out.item():.3f}/{loss_kd_feat.item():.3f}"  # loss_kd_out / loss_kd_feat
        if step % 20 == 0:
            bar.set_postfix(logs)
    for arm in arms:
        arm.student.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Checkpoints: safetensors with the settings that produced them, reused when those match


def load_or_train(
    path: Path, settings: dict, build: Callable[[], nn.Module], train: Callable[[], nn.Module], retrain: bool
) -> tuple[nn.Module, bool]:
    """Load path if it was saved with the same settings (and not retrain), else train and save it."""
    from safetensors import safe_open

    if path.exists() and not retrain:
        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {}).get("settings", "null"))
        if saved == json.loads(json.dumps(settings)):
            model = build()
            model.load_state_dict(load_file(str(path)))
            return model.eval().requires_grad_(False), True
        print(f"{path.name}: saved with other settings, retraining")
    model = train()
    save_atomic(model, path, settings)
    return model, False


def save_atomic(model: nn.Module, path: Path, settings: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"settings": json.dumps(settings)})
    os.replace(tmp, path)


def write_json_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Evaluation: per-digit judge accuracy, PNG grids, the side-by-side figure


def per_class_accuracy(pred: Tensor, labels: Tensor) -> list[float]:
    return [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else float("nan") for c in range(10)]


def summarize(acc: list[float], unseen: list[int], params: int) -> dict:
    seen = [a for c, a in enumerate(acc) if c not in unseen]
    return {
        "params": params,
        "per_class_accuracy": acc,
        "seen_mean": float(np.mean(seen)),
        "unseen_mean": float(np.mean([acc[c] for c in unseen])),
    }


def to_uint8(images: Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).numpy()  # (N, 28, 28)


def save_grid(images: Tensor, per_row: int, path: Path, pad: int = 2) -> np.ndarray:
    """images (10 * n, 1, 28, 28), digit-major -> one row per digit, per_row columns, grayscale PNG."""
    from PIL import Image

    n = len(images) // 10
    cells = to_uint8(images).reshape(10, n, 28, 28)[:, :per_row]
    grid = np.zeros((10 * (28 + pad) + pad, per_row * (28 + pad) + pad), dtype=np.uint8)
    for r in range(10):
        for c in range(cells.shape[1]):
            top, left = pad + r * (28 + pad), pad + c * (28 + pad)
            grid[top : top + 28, left : left + 28] = cells[r, c]
    Image.fromarray(grid).save(path, optimize=True)
    return grid


def save_comparison(grids: dict[str, np.ndarray], results: dict, unseen: list[int], path: Path) -> None:
    """The figure the README shows: one panel per model, rows = digits, per-digit judge accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"teacher": "teacher", "student_no_rc": "student, no RC", "student_rc": "student, RC"}
    fig, axes = plt.subplots(1, len(grids), figsize=(3.1 * len(grids), 3.6), dpi=100)
    for ax, (name, grid) in zip(np.atleast_1d(axes), grids.items()):
        m = results[name]
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{titles.get(name, name)}\nunseen {m['unseen_mean']:.2f} / seen {m['seen_mean']:.2f}", fontsize=9)
        step = grid.shape[0] / 10
        ax.set_yticks([step * (r + 0.5) for r in range(10)])
        ax.set_yticklabels(
            [f"{r}{'*' if r in unseen else ''} {m['per_class_accuracy'][r]:.2f}" for r in range(10)], fontsize=7
        )
        ax.set_xticks([])
        for r in unseen:
            ax.add_patch(plt.Rectangle((0, r * step), grid.shape[1] - 1, step, fill=False, ec="red", lw=1.5))
    fig.suptitle(
        f"digit {', '.join(map(str, unseen))} (*) never seen by the students; left of each row: the judge's accuracy",
        fontsize=9,
    )
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig, path: Path, colors: int = 64) -> None:
    """Save a matplotlib figure as a palette PNG: the sampled digits' speckle makes an RGB PNG ~3x larger."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    Image.open(buf).convert("RGB").quantize(colors).save(path, optimize=True)


def save_ablation_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [ablation_name(r["schedule"], r["lam"]) for r in rows]
    xs = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    ax.bar(xs - 0.2, [r["unseen_mean"] for r in rows], 0.4, label="unseen digit")
    ax.bar(xs + 0.2, [r["seen_mean"] for r in rows], 0.4, label="seen digits (mean)")
    ax.set_xticks(xs)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("judge accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1), ncol=2, frameon=False)
    fig.tight_layout()
    save_png(fig, path)


def ablation_name(schedule: str, lam: float) -> str:
    return f"{schedule} {lam:g}" if schedule in ("exp", "two_sided", "constant") else schedule


def print_table(results: dict, unseen: list[int], classifier_acc: float) -> None:
    head = f"{'model':<16}{'params':>9} " + "".join(f"{d:>6}" for d in range(10)) + f"{'seen':>7}{'unseen':>8}"
    print(head)
    print("-" * len(head))
    for name, m in results.items():
        accs = "".join(f"{a:>6.2f}" for a in m["per_class_accuracy"])
        print(f"{name:<16}{m['params']:>9,} {accs}{m['seen_mean']:>7.2f}{m['unseen_mean']:>8.2f}")
    print(f"classifier distilled without digit(s) {unseen}: accuracy on held-out images of them {classifier_acc:.2f}")


# -----------------------------------------------------------------------------
# Main: data, teacher, judge, students, evaluation


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    data = load_mnist(cfg.data_dir, cfg.seed)
    x_train, y_train = data["x_train"], data["y_train"]
    if data["split"]:
        print(
            f"only the test split is in {cfg.data_dir}: split it {len(x_train)} train / "
            f"{len(data['x_heldout'])} held out"
        )
    print(
        f"device {device}; {len(x_train)} training images, {len(data['x_heldout'])} held out; "
        f"unseen digits {cfg.unseen}"
    )
    data_sig = {"train": len(x_train), "split": data["split"], "seed": cfg.seed}
    alphas_cumprod = ddpm_schedule(cfg.num_train_timesteps)

    # --- teacher and judge: trained on all ten digits, reused from --out when the settings match
    t0 = time.perf_counter()
    teacher, reused = load_or_train(
        out / "teacher.safetensors",
        {
            "widths": cfg.teacher_widths,
            "steps": cfg.teacher_steps,
            "lr": cfg.teacher_lr,
            "batch": cfg.batch_size,
            "null_prob": cfg.null_prob,
            **data_sig,
        },
        lambda: UNet(cfg.teacher_widths).to(device, memory_format=torch.channels_last),
        lambda: train_teacher(cfg, x_train, y_train, device, alphas_cumprod),
        cfg.retrain,
    )
    timings["teacher"] = time.perf_counter() - t0
    print(
        f"teacher: {num_params(teacher):,} parameters, {'loaded' if reused else 'trained'} "
        f"in {timings['teacher']:.0f} s"
    )

    t0 = time.perf_counter()
    judge, reused = load_or_train(
        out / "judge.safetensors",
        {"width": cfg.judge_width, "steps": cfg.judge_steps, **data_sig},
        lambda: Classifier(cfg.judge_width).to(device),
        lambda: train_classifier(x_train, y_train, cfg.judge_steps, device, cfg.seed, cfg.judge_width),
        cfg.retrain,
    )
    timings["judge"] = time.perf_counter() - t0
    judge_acc = float((classify(judge, data["x_heldout"], device) == data["y_heldout"]).float().mean())
    print(f"judge: held-out accuracy {judge_acc:.4f} ({'loaded' if reused else 'trained'} in {timings['judge']:.0f} s)")

    # --- the contrast: a classifier distilled from the judge without the unseen digits still knows them
    t0 = time.perf_counter()
    x_seen, y_seen = without_digits(x_train, y_train, cfg.unseen)
    small = train_classifier(
        x_seen,
        None,
        cfg.classifier_steps,
        device,
        cfg.seed + 5,
        width=8,
        teacher=judge,
        temperature=cfg.kd_temperature,
        desc="classifier KD",
    )
    is_unseen = torch.isin(data["y_heldout"], torch.tensor(cfg.unseen))
    pred = classify(small, data["x_heldout"][is_unseen], device)
    classifier_acc = float((pred == data["y_heldout"][is_unseen]).float().mean())
    timings["classifier"] = time.perf_counter() - t0

    # --- the students' images: seen digits only, real or drawn by the teacher
    if cfg.images == "teacher":
        t0 = time.perf_counter()
        seen = torch.tensor([d for d in range(10) if d not in cfg.unseen])
        y_seen = seen[torch.arange(cfg.teacher_images) % len(seen)]
        noise = torch.randn(cfg.teacher_images, 1, 28, 28, generator=torch.Generator().manual_seed(cfg.seed + 4))
        x_seen = ddim_sample(
            teacher, y_seen.to(device), noise.to(device), alphas_cumprod, cfg.sample_steps, cfg.guidance
        ).cpu()
        timings["teacher_images"] = time.perf_counter() - t0
    assert not torch.isin(y_seen, torch.tensor(cfg.unseen)).any()

    # --- students: no RC and RC (and, with --ablate, every other schedule), same data, seeds and steps
    arms = [Arm("student_no_rc", "none", 0.0), Arm("student_rc", cfg.rc_schedule, cfg.rc_lambda)]
    if cfg.ablate:
        have = {(a.schedule, a.lam if a.schedule in ("exp", "two_sided", "constant") else 0.0) for a in arms}
        arms += [Arm(f"ablate_{s}_{lam:g}", s, lam) for s, lam in ABLATION if (s, lam) not in have]
    train_students(cfg, arms, teacher, x_seen, y_seen, device, alphas_cumprod)
    for arm in arms:
        save_atomic(arm.student, out / f"{arm.name}.safetensors", {"schedule": arm.schedule, "lam": arm.lam})
        timings[arm.name] = arm.seconds

    # --- evaluation: the same noise for every model, the judge scores every sample
    t0 = time.perf_counter()
    n = cfg.samples_per_digit
    labels = torch.arange(10).repeat_interleave(n)  # (10 n,) digit-major
    noise = torch.randn(10 * n, 1, 28, 28, generator=torch.Generator().manual_seed(cfg.seed + 6))
    models = {"teacher": teacher, **{a.name: a.student for a in arms}}
    results, grids = {}, {}
    for name, model in tqdm(models.items(), desc="sampling", dynamic_ncols=True):
        samples = ddim_sample(
            model, labels.to(device), noise.to(device), alphas_cumprod, cfg.sample_steps, cfg.guidance
        ).cpu()
        acc = per_class_accuracy(classify(judge, samples, device), labels)
        results[name] = summarize(acc, cfg.unseen, num_params(model))
        if not name.startswith("ablate_"):
            grids[name] = save_grid(samples, min(n, 10), out / f"samples_{name}.png")
    timings["sampling"] = time.perf_counter() - t0

    main_models = {k: results[k] for k in ("teacher", "student_no_rc", "student_rc")}
    save_comparison(grids, main_models, cfg.unseen, out / "comparison.png")
    timings["total"] = time.perf_counter() - t_start
    report = {
        "config": asdict(cfg),
        "unseen": cfg.unseen,
        "device": str(device),
        "data": {
            "train": len(x_train),
            "heldout": len(data["x_heldout"]),
            "students_train": len(x_seen),
            "test_split_only": data["split"],
        },
        "judge_heldout_accuracy": judge_acc,
        "classifier_student_unseen_accuracy": classifier_acc,
        "models": main_models,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    if cfg.ablate:
        report["ablation"] = [
            {
                "schedule": a.schedule,
                "lam": a.lam,
                "seen_mean": results[a.name]["seen_mean"],
                "unseen_mean": results[a.name]["unseen_mean"],
            }
            for a in arms
        ]
        save_ablation_plot(report["ablation"], out / "ablation.png")
    write_json_atomic(report, out / "results.json")

    print()
    print_table(main_models, cfg.unseen, classifier_acc)
    if cfg.ablate:
        print("\nablation (p(t) schedule): unseen / seen mean")
        for r in report["ablation"]:
            print(f"  {ablation_name(r['schedule'], r['lam']):<14} {r['unseen_mean']:.2f} / {r['seen_mean']:.2f}")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"wrote {out / 'results.json'}, {out / 'comparison.png'}")
    return report


if __name__ == "__main__":
    main()
