"""
Compress Stable Diffusion with Random Conditioning distillation (Kim et al., CVPR 2025).

A BK-SDM-style student UNet learns to copy a frozen Stable Diffusion teacher (output + block-feature
distillation) on cached latents, while the caption fed to both is often swapped for a random one from
a large text pool (randcond.py). The latent cache is built by this script when missing.

One GPU (or CPU, or a quick look; no torchrun needed):
    python train.py --teacher CompVis/stable-diffusion-v1-4 --student bk_base \
        --data data/laion212k --prompts captions_212k.txt --text-pool laion_20m.txt \
        --output-dir runs/bk_base_rc

One node, 4 GPUs (total batch 256 = 64 per GPU x 4, as published):
    torchrun --standalone --nproc_per_node=4 train.py ...same flags...

Two nodes of 8 GPUs (run on each node; HOST is node 0):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        --rdzv-id=rc train.py ...same flags...
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from randcond import SCHEDULES, FeatureDistiller, RandomConditioner, TextPool, output_kd_loss, relational_kd_loss

STUDENTS = ("bk_base", "bk_small", "bk_tiny", "c_base", "c_small", "c_tiny", "c_micro")
C_WIDTHS = {"c_base": 256, "c_small": 224, "c_tiny": 192, "c_micro": 160}  # base width, SD's is 320
VALIDATION_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a red sports car parked on a city street at night",
    "a bowl of fruit on a wooden table, oil painting",
    "a cat sitting in a field of flowers",
]

# -----------------------------------------------------------------------------
# config: one flat block; defaults are the paper's (REFERENCE.md)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    # models
    p.add_argument(
        "--teacher", default="CompVis/stable-diffusion-v1-4", help="diffusers SD v1.x/v2.x pipeline: hub id or folder"
    )
    p.add_argument(
        "--student", default="bk_base", help=f"one of {', '.join(STUDENTS)}, or a path to a UNet config.json"
    )
    p.add_argument(
        "--init",
        choices=["teacher", "random"],
        default=None,
        help="student init; default: teacher weights for bk_*, random for c_* and configs",
    )
    # paired data: a latent cache, built from prompts (image-free) or from captioned images when missing
    p.add_argument("--data", required=True, help="latent cache folder (built here when it has no meta.json)")
    p.add_argument("--prompts", default=None, help="text file, one prompt a line: the teacher generates the latents")
    p.add_argument(
        "--images", default=None, help="folder of images with metadata.jsonl or metadata.csv (file_name,text)"
    )
    p.add_argument("--shard-size", type=int, default=4096, help="samples per cache shard file")
    p.add_argument("--gen-steps", type=int, default=25, help="teacher sampling steps for --prompts")
    p.add_argument("--gen-guidance", type=float, default=7.5, help="classifier-free guidance for --prompts")
    # random conditioning
    p.add_argument(
        "--text-pool",
        nargs="+",
        default=[],
        help="extra prompt files for the pool (the paired captions are always in it)",
    )
    p.add_argument(
        "--random-conditioning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="swap captions for pool prompts with probability p(t); off: plain distillation",
    )
    p.add_argument("--rc-schedule", choices=SCHEDULES, default="exp", help="p(t) schedule")
    p.add_argument("--rc-lambda", type=float, default=5.0, help="lambda in p(t) = exp(-lambda (1 - t/T))")
    p.add_argument("--null-prob", type=float, default=0.1, help="probability of the empty caption (for CFG)")
    # optimisation
    p.add_argument("--resolution", type=int, default=None, help="training resolution in pixels; default: the teacher's")
    p.add_argument("--max-steps", type=int, default=50_000, help="optimizer steps (0: build the cache and stop)")
    p.add_argument("--batch-size", type=int, default=64, help="per device, per micro-step")
    p.add_argument("--total-batch-size", type=int, default=256, help="samples per optimizer step over all devices")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear lr warm-up, then constant")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lambda-out", type=float, default=1.0, help="output KD weight")
    p.add_argument("--lambda-feat", type=float, default=1.0, help="feature KD weight")
    p.add_argument("--lambda-task", type=float, default=0.0, help="denoising loss weight, paired samples only")
    p.add_argument("--lambda-rel", type=float, default=0.0, help="relational KD weight (RDD)")
    p.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="fp16",
        help="autocast dtype on CUDA (the paper: fp16; bf16 needs no loss scaling); CPU runs fp32",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute student activations in backward: less memory, about a third more compute",
    )
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="keep an EMA of the student")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--compile", action="store_true", help="torch.compile the resnet and transformer blocks")
    # output
    p.add_argument("--output-dir", required=True)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the latest checkpoints to keep")
    p.add_argument(
        "--resume", nargs="?", const="latest", default=None, help="'latest' in --output-dir, or a checkpoint file"
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines (and NaN checks)")
    p.add_argument("--validate-every", type=int, default=1000, help="steps between validation grids (0: never)")
    p.add_argument("--validation-steps", type=int, default=25)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without it, one process


def setup_ddp() -> tuple[bool, int, int, int, torch.device]:
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Building the cache makes ranks wait on each other for up to one shard; allow that, not forever.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return True, rank, local_rank, world_size, device


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# teacher and students


def load_teacher(name: str, dtype: torch.dtype, device: torch.device):
    """Frozen teacher parts: (unet, vae, text_encoder, tokenizer, noise_scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = {}
    for part, cls in [
        ("unet", UNet2DConditionModel),
        ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel),
        ("tokenizer", CLIPTokenizer),
        ("scheduler", DDPMScheduler),
    ]:
        kwargs = {"torch_dtype": dtype} if part in ("unet", "vae", "text_encoder") else {}
        try:
            parts[part] = cls.from_pretrained(name, subfolder=part, **kwargs)
        except (OSError, ValueError) as e:
            raise SystemExit(
                f"error: --teacher {name} has no loadable {part} (expected a diffusers Stable Diffusion "
                f"pipeline: unet, vae, text_encoder, tokenizer, scheduler): {str(e).splitlines()[0]}"
            )
    unet, vae, text_encoder, tokenizer, noise_scheduler = parts.values()
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval().to(device)
    return unet, vae, text_encoder, tokenizer, noise_scheduler


def pipeline_with(unet, teacher_parts, teacher: str):
    """A stock pipeline around any UNet: PNDM sampling as in the paper's evaluation, no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    _, vae, text_encoder, tokenizer, _ = teacher_parts
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_pretrained(teacher, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


PER_BLOCK_KEYS = (
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "reverse_transformer_layers_per_block",
    "only_cross_attention",
    "layers_per_block",
)


def student_config(teacher_config: dict, name: str) -> dict:
    """Derive a student UNet config from the teacher's, so SD v2 and non-512 teachers work too."""
    cfg = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    n_blocks = len(cfg["block_out_channels"])
    if name.startswith("bk_"):
        cfg["layers_per_block"] = 1  # one resnet (+ attention) per stage instead of two
        if name in ("bk_small", "bk_tiny"):
            cfg["mid_block_type"] = None
        if name == "bk_tiny":  # drop the innermost down stage and the outermost up stage
            cfg["down_block_types"] = list(cfg["down_block_types"])[:-1]
            cfg["up_block_types"] = list(cfg["up_block_types"])[1:]
            # per-stage lists are indexed by down stage (up stages read them reversed), so dropping the
            # last entry keeps every surviving stage's settings
            for key in ("block_out_channels",) + PER_BLOCK_KEYS:
                if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == n_blocks:
                    cfg[key] = list(cfg[key])[:-1]
    elif name in C_WIDTHS:
        scale, groups = C_WIDTHS[name] / 320, cfg["norm_num_groups"]
        widths = [max(groups, round(c * scale / groups) * groups) for c in cfg["block_out_channels"]]
        cfg["block_out_channels"] = widths
        # diffusers SD configs store the number of heads in attention_head_dim; keep it if it divides
        key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
        heads = cfg[key] if isinstance(cfg[key], (list, tuple)) else [cfg[key]] * n_blocks
        cfg[key] = [max(h for h in range(1, hd + 1) if w % h == 0) for w, hd in zip(widths, heads)]
    else:
        raise ValueError(name)
    return cfg


def teacher_name(student_param: str, student: str) -> str:
    """The teacher parameter a block-pruned student parameter is copied from (BK-SDM's mapping)."""
    parts = student_param.split(".")
    if parts[0] == "up_blocks":
        if student == "bk_tiny":  # the outermost up stage is gone: student stage k is teacher stage k+1
            parts[1] = str(int(parts[1]) + 1)
        if parts[2] in ("resnets", "attentions") and parts[3] == "1":  # up stages keep layers 0 and 2
            parts[3] = "2"
    return ".".join(parts)


def build_student(teacher_unet: nn.Module, spec: str, init: str | None):
    """(student UNet in fp32 on the teacher's device, {student layer: teacher layer} for feature KD)."""
    from diffusers import UNet2DConditionModel

    if spec in STUDENTS:
        cfg = student_config(teacher_unet.config, spec)
    elif Path(spec).is_file():
        cfg = json.loads(Path(spec).read_text())
    elif Path(spec, "config.json").is_file():
        cfg = json.loads(Path(spec, "config.json").read_text())
    else:
        raise SystemExit(
            f"error: unknown --student {spec!r}; use one of {', '.join(STUDENTS)} or a path to a UNet config.json"
        )
    init = init or ("teacher" if spec.startswith("bk_") else "random")
    student = UNet2DConditionModel.from_config(cfg)
    if init == "teacher":
        if spec.startswith("c_"):
            raise SystemExit(
                f"error: --student {spec} is narrower than the teacher and cannot copy its weights; use --init random"
            )
        t_state = teacher_unet.state_dict()
        state, missing = {}, []
        for k, v in student.state_dict().items():
            tk = teacher_name(k, spec) if spec in STUDENTS else k
            if tk in t_state and t_state[tk].shape == v.shape:
                state[k] = t_state[tk].float()
            else:
                missing.append(k)
        if spec in STUDENTS and missing:  # our own derivation must map every weight
            raise RuntimeError(f"teacher init left {len(missing)} student weights unmapped, e.g. {missing[:3]}")
        student.load_state_dict(state, strict=False)
        if missing:
            print0(f"teacher init: {len(state)} tensors copied by name, {len(missing)} left random")
    # feature KD layers: stage outputs, as published; bk_tiny pairs its shorter paths as BK-SDM does
    if spec == "bk_tiny":
        layers = {
            "down_blocks.0": "down_blocks.0",
            "down_blocks.1": "down_blocks.1",
            "down_blocks.2.attentions.0.proj_out": "down_blocks.2.attentions.1.proj_out",
            "up_blocks.0": "up_blocks.1",
            "up_blocks.1": "up_blocks.2",
            "up_blocks.2": "up_blocks.3",
        }
    else:
        n_down = min(len(student.down_blocks), len(teacher_unet.down_blocks))
        n_up = min(len(student.up_blocks), len(teacher_unet.up_blocks))
        layers = {f"down_blocks.{i}": f"down_blocks.{i}" for i in range(n_down)}
        layers |= {f"up_blocks.{i}": f"up_blocks.{i}" for i in range(n_up)}
    return student.to(teacher_unet.device), layers


class Student(nn.Module):
    """What DDP wraps: the student UNet and the distiller (its 1x1 projections), so one forward uses
    every trainable parameter and DDP reduces them all in one backward."""

    def __init__(self, unet: nn.Module, distiller: FeatureDistiller | None, feat: bool, rel: bool):
        super().__init__()
        self.unet, self.distiller, self.feat, self.rel = unet, distiller, feat, rel

    def forward(self, noisy_latents, timesteps, encoder_hidden_states):
        model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states).sample  # (B, 4, h, w)
        loss_rel = loss_kd_feat = model_pred.new_zeros((), dtype=torch.float32)
        if self.rel:  # before loss(), which clears the stored activations
            loss_rel = relational_kd_loss(*self.distiller.features())
        if self.feat:
            loss_kd_feat = self.distiller.loss()
        elif self.distiller is not None:
            self.distiller.clear()
        return model_pred, loss_kd_feat, loss_rel


def n_params(m: nn.Module) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"


# -----------------------------------------------------------------------------
# paired data: latents in a few large .npy shards (memory-mapped) + captions, built when missing


def read_lines(path: str) -> list[str]:
    if not Path(path).is_file():
        raise SystemExit(f"error: --prompts file not found: {path}")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    if not lines:
        raise SystemExit(f"error: --prompts {path} has no prompt (one per line)")
    return lines


def read_image_captions(folder: str) -> list[tuple[str, str]]:
    import csv

    root = Path(folder)
    if (root / "metadata.jsonl").is_file():
        rows = [
            json.loads(line)
            for line in (root / "metadata.jsonl").read_text(encoding="utf-8").split("\n")
            if line.strip()
        ]
    elif (root / "metadata.csv").is_file():
        with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise SystemExit(f"error: --images {folder} needs metadata.jsonl or metadata.csv with file_name,text")
    items = [(str(root / r["file_name"]), r["text"]) for r in rows]
    if not items:
        raise SystemExit(f"error: --images {folder}: the metadata lists no image")
    missing = [f for f, _ in items if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"error: --images: {len(missing)} listed images are missing, e.g. {missing[0]}")
    return items


def atomic_save(path: Path, write) -> None:
    """write(tmp_path), flush it to disk, then rename over path: a crash leaves the old file or the
    new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to the .tmp name
        np.save(f, array)


@torch.no_grad()
def encode_shard(items, kind, teacher_parts, args, resolution, dtype, device, start: int) -> np.ndarray:
    """Latents (n, 4, h, w) float16 for one shard: teacher samples for prompts, VAE means for images."""
    from PIL import Image

    vae, out = teacher_parts[1], []
    pipe = pipeline_with(teacher_parts[0], teacher_parts, args.teacher)
    pipe.set_progress_bar_config(disable=True)
    for i in range(0, len(items), args.batch_size):
        batch = items[i : i + args.batch_size]
        if kind == "prompts":
            # one fixed seed per prompt (seed + its index), so the cache does not depend on sharding
            gens = [torch.Generator(device).manual_seed(args.seed + start + i + j) for j in range(len(batch))]
            latents = pipe(
                batch,
                height=resolution,
                width=resolution,
                num_inference_steps=args.gen_steps,
                guidance_scale=args.gen_guidance,
                generator=gens,
                output_type="latent",
            ).images
        else:
            pixels = []
            for file, _ in batch:
                img = Image.open(file).convert("RGB")
                s = min(img.size)  # center crop to a square, then resize
                left, top = (img.width - s) // 2, (img.height - s) // 2
                img = img.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
                pixels.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))  # (3, H, W) uint8
            x = torch.stack(pixels).to(device, dtype) / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
            # the posterior mean: its std is tiny for SD's VAE, and a cache should not freeze one noise draw
            latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        out.append(latents.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


def build_cache(args, teacher_parts, resolution, latent_shape, dtype, device, ddp, rank, world_size) -> None:
    """Fill args.data with shards latents-XXXXX.npy + captions-XXXXX.json, split across ranks by shard.
    Finished shards are kept, so an interrupted build resumes; meta.json is written last."""
    data = Path(args.data)
    if args.prompts and args.images:
        raise SystemExit("error: pass --prompts or --images, not both")
    if not (args.prompts or args.images):
        raise SystemExit(
            f"error: {data} holds no latent cache (meta.json); pass --prompts FILE or --images DIR to build it"
        )
    kind = "prompts" if args.prompts else "images"
    items = read_lines(args.prompts) if args.prompts else read_image_captions(args.images)
    captions = items if kind == "prompts" else [c for _, c in items]
    data.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(items) / args.shard_size)
    mine = [k for k in range(rank, n_shards, world_size) if not (data / f"latents-{k:05d}.npy").is_file()]
    print0(f"latent cache: {len(items)} {kind}, {n_shards} shards, {len(mine)} to build on rank 0")
    for k in tqdm(mine, desc="cache", disable=rank != 0):
        lo, hi = k * args.shard_size, min(len(items), (k + 1) * args.shard_size)
        latents = encode_shard(items[lo:hi], kind, teacher_parts, args, resolution, dtype, device, lo)
        atomic_save(data / f"captions-{k:05d}.json", lambda p: p.write_text(json.dumps(captions[lo:hi])))
        atomic_save(data / f"latents-{k:05d}.npy", lambda p: save_npy(p, latents))
    if ddp:
        dist.barrier()  # every shard is on disk
    if rank == 0:
        # the paired captions join the text pool as published: one per line, newlines flattened
        atomic_save(
            data / "captions.txt",
            lambda p: p.write_text("".join(" ".join(c.split()) + "\n" for c in captions), encoding="utf-8"),
        )
        meta = {
            "num_samples": len(items),
            "num_shards": n_shards,
            "latent_shape": list(latent_shape),
            "source": kind,
            "teacher": args.teacher,
            "resolution": resolution,
        }
        atomic_save(data / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    if ddp:
        dist.barrier()


class LatentCache:
    """Memory-mapped latents and their captions; a batch is one fancy-indexed read per shard."""

    def __init__(self, data: Path):
        self.meta = json.loads((data / "meta.json").read_text())
        self.latents = [np.load(data / f"latents-{k:05d}.npy", mmap_mode="r") for k in range(self.meta["num_shards"])]
        self.captions = [
            c for k in range(self.meta["num_shards"]) for c in json.loads((data / f"captions-{k:05d}.json").read_text())
        ]
        self.starts = np.cumsum([0] + [len(x) for x in self.latents])
        if self.starts[-1] != len(self.captions) or len(self.captions) == 0:
            raise SystemExit(f"error: latent cache {data} is empty or inconsistent; delete it and rebuild")

    def __len__(self) -> int:
        return len(self.captions)

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), *self.latents[0].shape[1:]), dtype=np.float16)
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            local = indices[sel] - self.starts[k]
            order = np.argsort(local)  # sorted reads are sequential on disk
            out[sel[order]] = self.latents[k][local[order]]
        return torch.from_numpy(out), [self.captions[i] for i in indices]


class ShardedSampler:
    """Batch b of this rank is a pure function of (seed, epoch, rank, b): one permutation per epoch,
    shared by all ranks, cut into equal disjoint slices by global rank. Resuming needs only the count."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.per_rank = n // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise SystemExit(
                f"error: the cache holds {n} samples, fewer than {world_size} ranks x --batch-size {batch_size}"
            )
        self.n, self.batch_size, self.rank, self.seed, self._epoch, self._mine = n, batch_size, rank, seed, -1, None

    def batch(self, b: int) -> np.ndarray:
        epoch, i = divmod(b, self.batches_per_epoch)
        if epoch != self._epoch:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
            self._epoch, self._mine = epoch, perm[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return self._mine[i * self.batch_size : (i + 1) * self.batch_size]


# -----------------------------------------------------------------------------
# checkpoints, validation, export


@torch.no_grad()
def validate(unet, teacher_parts, args, resolution, autocast, path: Path) -> None:
    """A grid of the fixed validation prompts, fixed seeds, so grids compare across steps and runs."""
    from PIL import Image

    pipe = pipeline_with(unet, teacher_parts, args.teacher)
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    gens = [torch.Generator(device).manual_seed(args.seed + i) for i in range(len(VALIDATION_PROMPTS))]
    with autocast:
        images = pipe(
            VALIDATION_PROMPTS,
            height=resolution,
            width=resolution,
            num_inference_steps=args.validation_steps,
            generator=gens,
            output_type="np",
        ).images  # (N, H, W, 3) in [0, 1]
    grid = np.concatenate(list(images), axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda p: Image.fromarray((grid * 255).round().astype(np.uint8)).save(p, format="PNG"))


def export(unet, ema_params, args, out: Path) -> None:
    """unet/ (EMA weights when EMA is on, as BK-SDM publishes; raw ones in unet_no_ema/) inside the
    teacher's own pipeline (its fp32 VAE, text encoder, tokenizer and scheduler): a folder that
    StableDiffusionPipeline.from_pretrained loads. Written beside, then moved in part by part, so a
    crash here leaves the checkpoints and any older export intact."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final = UNet2DConditionModel.from_config(unet.config)  # a clean copy: no hooks, compile or checkpointing
    final.load_state_dict({k: v.float().cpu() for k, v in unet.state_dict().items()})
    if ema_params is not None:
        final.save_pretrained(tmp / "unet_no_ema")
        for p, e in zip(final.parameters(), ema_params):
            p.data.copy_(e)
    StableDiffusionPipeline.from_pretrained(
        args.teacher, unet=final, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(tmp)
    for item in sorted(tmp.iterdir()):
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def fingerprint(model: nn.Module) -> torch.Tensor:
    """float64 sum of each parameter tensor. DDP gives every rank the same reduced gradients, so the
    sums must match exactly; any difference means a parameter escaped the reduction."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()])


# -----------------------------------------------------------------------------
# training


def train(args) -> nn.Module | None:
    """Build or open the cache, train, export. Returns the trained module (student UNet + projections)."""
    ddp, rank, local_rank, world_size, device = setup_ddp()
    try:
        return _train(args, ddp, rank, world_size, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(args, ddp, rank, world_size, device) -> nn.Module | None:
    out = Path(args.output_dir)
    if args.total_batch_size % (args.batch_size * world_size):
        raise SystemExit(
            f"error: --total-batch-size {args.total_batch_size} is not a multiple of --batch-size "
            f"{args.batch_size} x {world_size} processes; change one of them"
        )
    grad_accum = args.total_batch_size // (args.batch_size * world_size)
    if args.student not in STUDENTS and not Path(args.student).exists():  # before any slow work
        raise SystemExit(
            f"error: unknown --student {args.student!r}; use one of {', '.join(STUDENTS)} or a path to a UNet config.json"
        )
    try:  # each pool file on its own, now: an empty or wrong one would otherwise surface after the cache build
        for f in args.text_pool:
            TextPool(Path(f))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --text-pool: {e}")
    cuda = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision) if cuda else None
    autocast = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)  # same on every rank: identical student init and projections

    teacher_parts = load_teacher(args.teacher, dtype or torch.float32, device)
    teacher, vae, text_encoder, tokenizer, noise_scheduler = teacher_parts
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = args.resolution or teacher.config.sample_size * vae_scale
    multiple = vae_scale * 2 ** (len(teacher.config.block_out_channels) - 1)  # every UNet stage halves the latents
    if resolution % multiple:
        raise SystemExit(f"error: --resolution {resolution} must be a multiple of {multiple}")
    latent_shape = (teacher.config.in_channels, resolution // vae_scale, resolution // vae_scale)

    # --- paired data and text pool
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        build_cache(
            args, teacher_parts, resolution, latent_shape, dtype or torch.float32, device, ddp, rank, world_size
        )
    cache = LatentCache(data)
    if tuple(cache.meta["latent_shape"]) != latent_shape:
        raise SystemExit(
            f"error: cache {data} holds latents of shape {tuple(cache.meta['latent_shape'])}, the teacher at "
            f"{resolution}px needs {latent_shape}; set --resolution {cache.meta['resolution']} or use a new --data"
        )
    print0(f"paired data: {len(cache)} cached latents {latent_shape} from {cache.meta['source']}")
    if args.max_steps == 0:
        return None
    try:
        pool = TextPool([data / "captions.txt"] + [Path(f) for f in args.text_pool]).shard(rank, world_size)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: text pool: {e}")
    print0(f"text pool: {len(pool) * world_size} prompts (~{len(pool)} on each of {world_size} ranks)")
    conditioner = RandomConditioner(
        pool,
        noise_scheduler.config.num_train_timesteps,
        schedule=args.rc_schedule if args.random_conditioning else "none",
        lam=args.rc_lambda,
        null_prob=args.null_prob,
    )

    # --- student, distiller, optimizer
    unet, layers = build_student(teacher, args.student, args.init)
    print0(f"teacher UNet {n_params(teacher)} params, student {args.student} {n_params(unet)}")
    distiller = None
    if args.lambda_feat > 0 or args.lambda_rel > 0:
        distiller = FeatureDistiller(teacher, unet, layers)
        if args.lambda_feat > 0:
            x = torch.zeros(1, *latent_shape, device=device)
            ehs = torch.zeros(1, tokenizer.model_max_length, text_encoder.config.hidden_size, device=device)
            try:
                with autocast:
                    distiller.probe(x, torch.tensor([1], device=device), ehs)
            except ValueError as e:
                raise SystemExit(f"error: feature KD layers do not match: {e}; set --lambda-feat 0")
        print0(f"feature KD on {len(layers)} layers, {len(distiller.proj)} projections ({n_params(distiller)})")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.compile:
        # Regional compilation: the hooked stage modules stay eager so hooks come and go freely. All
        # blocks of a kind share one code object, and each width recompiles it: allow for that.
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(cfg, limit, max(getattr(cfg, limit), 64))
        for m in list(unet.modules()) + list(teacher.modules()):
            if isinstance(m, (BasicTransformerBlock, ResnetBlock2D)):
                m.compile()
    model = Student(unet, distiller, feat=args.lambda_feat > 0, rel=args.lambda_rel > 0).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=args.lr,
        betas=(0.9, 0.999),
        weight_decay=args.weight_decay,
        **({"fused": True} if cuda else {"foreach": True}),
    )  # one kernel, not one per tensor
    lr_at = lambda step: args.lr * min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else args.lr  # noqa: E731
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ema = [p.detach().clone().float() for p in unet.parameters()] if args.ema else None
    weights = [p.detach() for p in unet.parameters()]  # views: they follow the optimizer's in-place updates

    # --- resume: weights, optimizer, scaler, EMA, step; the data position and every random draw
    # are functions of the step (see ShardedSampler and the per-step generators below)
    step = 0
    if args.resume:
        ckpts = sorted((out / "checkpoints").glob("step-*.pt"))  # .tmp files never match: only complete ones
        ckpt_path = Path(args.resume) if args.resume != "latest" else ckpts[-1] if ckpts else out / "checkpoints"
        if not ckpt_path.is_file():
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt["world_size"] != world_size or ckpt["total_batch_size"] != args.total_batch_size:
            raise SystemExit(
                f"error: {ckpt_path} was written by {ckpt['world_size']} processes at total batch "
                f"{ckpt['total_batch_size']}; resume with the same"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:  # a run that had no EMA starts one from the resumed weights
            ema = [e.to(device) for e in ckpt["ema"]] if ckpt["ema"] is not None else [w.clone() for w in weights]
        step = ckpt["step"]
        print0(f"resumed from {ckpt_path} at step {step}")
        del ckpt

    if ddp:
        model = DDP(model, device_ids=[device.index] if cuda else None)
    raw = model.module if ddp else model
    sampler = ShardedSampler(len(cache), args.batch_size, rank, world_size, args.seed)
    T = noise_scheduler.config.num_train_timesteps
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    print0(
        f"{world_size} processes x batch {args.batch_size} x {grad_accum} accumulation = {args.total_batch_size} per step, "
        f"{args.max_steps} steps on {device.type}, autocast {dtype}"
    )

    # --- the loop
    logged = torch.zeros(6, device=device)  # loss, loss_kd_out, loss_kd_feat, loss_task, loss_rel, swapped
    t_last, steps_since = time.time(), 0
    bar = tqdm(total=args.max_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    while step < args.max_steps:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        for micro in range(grad_accum):
            micro_step = step * grad_accum + micro
            # one stream per (seed, global rank, micro-step): distinct across ranks, replayed on resume
            g_cpu = torch.Generator().manual_seed((args.seed + rank) * 1_000_003 + micro_step)
            g_dev = torch.Generator(device).manual_seed((args.seed + rank) * 1_000_003 + micro_step) if cuda else g_cpu

            # host side first, while the GPU still runs the last step: a copy from pageable memory waits for it
            latents, captions = cache.get(sampler.batch(micro_step))  # (B, 4, h, w) float16
            timesteps = torch.randint(0, T, (len(captions),), generator=g_cpu)
            captions, paired = conditioner(captions, timesteps, generator=g_cpu)  # swap, then null-drop
            input_ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            latents, timesteps, paired, input_ids = (x.to(device) for x in (latents, timesteps, paired, input_ids))
            latents = latents.float()
            noise = torch.randn(latents.shape, generator=g_dev, device=device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)  # q(x_t | x_0)

            sync = contextlib.nullcontext() if (not ddp or micro == grad_accum - 1) else model.no_sync()
            with sync, distiller if distiller is not None else contextlib.nullcontext():
                with torch.no_grad(), autocast:
                    encoder_hidden_states = text_encoder(input_ids)[0]  # (B, 77, D)
                    teacher_pred = teacher(noisy_latents, timesteps, encoder_hidden_states).sample
                with autocast:
                    model_pred, loss_kd_feat, loss_rel = model(noisy_latents, timesteps, encoder_hidden_states)
                loss_kd_out = output_kd_loss(model_pred, teacher_pred)
                loss_task = torch.zeros_like(loss_kd_out)
                if args.lambda_task > 0:  # denoising loss over paired samples only
                    target = (
                        noise
                        if noise_scheduler.config.prediction_type == "epsilon"
                        else noise_scheduler.get_velocity(latents, noise, timesteps)
                    )  # v-prediction (SD 2 at 768 px)
                    per_sample = F.mse_loss(model_pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
                    loss_task = (per_sample * paired).sum() / paired.sum().clamp(min=1)
                loss = (
                    args.lambda_out * loss_kd_out
                    + args.lambda_feat * loss_kd_feat
                    + args.lambda_task * loss_task
                    + args.lambda_rel * loss_rel
                )
                scaler.scale(loss / grad_accum).backward()
            swapped = 1 - paired.float().mean()  # share of samples trained on a random caption
            logged += torch.stack([loss, loss_kd_out, loss_kd_feat, loss_task, loss_rel, swapped]).detach() / grad_accum

        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:  # diffusers EMAModel's warm-up: decay = min(d, (1 + n) / (10 + n))
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, weights, 1 - decay)
        step += 1
        steps_since += 1
        bar.update(1)

        last = step == args.max_steps
        if step % args.log_every == 0 or last or step % args.checkpoint_every == 0:
            # averaged over ranks, so every rank sees the same NaN and stops together
            if ddp:
                dist.all_reduce(logged)
            vals = (logged / (steps_since * world_size)).tolist()
            if not all(math.isfinite(v) for v in vals):
                bar.close()
                raise SystemExit(
                    f"error: loss is {vals[0]} at step {step}; lower --lr or use --mixed-precision bf16 "
                    f"(checkpoints up to step {step - steps_since} are intact)"
                )
            dt = (time.time() - t_last) / steps_since
            rec = {
                "step": step,
                "loss": vals[0],
                "loss_kd_out": vals[1],
                "loss_kd_feat": vals[2],
                "loss_task": vals[3],
                "loss_rel": vals[4],
                "rc_swap_rate": vals[5],
                "lr": lr_at(step - 1),
                "grad_norm": float(grad_norm),
                "step_time": dt,
                "samples_per_s": args.total_batch_size / dt,
            }
            if rank == 0:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.write(
                    f"step {step} | loss {vals[0]:.4f} | kd_out {vals[1]:.4f} | kd_feat {vals[2]:.4f} | task "
                    f"{vals[3]:.4f} | rel {vals[4]:.4f} | swapped {vals[5]:.2f} | lr {rec['lr']:.2e} | {dt:.3f} s/step"
                )
            logged.zero_()
            t_last, steps_since = time.time(), 0

        if step % args.checkpoint_every == 0 or last:
            if rank == 0:
                state = {
                    "step": step,
                    "data_position": step * grad_accum,
                    "world_size": world_size,
                    "total_batch_size": args.total_batch_size,
                    "model": raw.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "ema": ema,
                    "args": {k: v for k, v in vars(args).items()},
                }
                (out / "checkpoints").mkdir(parents=True, exist_ok=True)
                atomic_save(out / "checkpoints" / f"step-{step:07d}.pt", lambda p: torch.save(state, p))
                for old in sorted((out / "checkpoints").glob("step-*.pt"))[: -max(1, args.keep_checkpoints)]:
                    old.unlink()
        if rank == 0 and args.validate_every and (step % args.validate_every == 0 or last):
            validate(unet, teacher_parts, args, resolution, autocast, out / "samples" / f"step-{step:07d}.png")
    bar.close()

    # --- the end: check that DDP kept every rank in step, then export on rank 0
    if ddp:
        fp = fingerprint(raw)
        fps = [torch.empty_like(fp) for _ in range(world_size)]
        dist.all_gather(fps, fp)
        if not all(torch.equal(fps[0], f) for f in fps):
            raise SystemExit("error: student weights differ across ranks after training")
        print0(f"student weights identical on all {world_size} ranks")
    if rank == 0:
        export(unet, ema, args, out)
        print0(f"saved the student pipeline to {out} (StableDiffusionPipeline.from_pretrained)")
    return raw


if __name__ == "__main__":
    train(parse_args())
