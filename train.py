"""
Compress Stable Diffusion with Random Conditioning distillation (Kim et al., CVPR 2025).

A BK-SDM-style student UNet (KOALA-style for SDXL) learns to copy a frozen Stable Diffusion v1 / v2 or
SDXL teacher (output + feature distillation) on cached latents, while the caption fed to both is often
swapped for a random one from a large text pool (randcond.py). The latent cache is built here when missing.

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
import csv
import datetime
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from randcond import SCHEDULES, FeatureDistiller, RandomConditioner, TextPool, output_kd_loss, relational_kd_loss

STUDENTS = ("bk_base", "bk_small", "bk_tiny", "c_base", "c_small", "c_tiny", "c_micro", "koala_1b", "koala_700m")
KOALA = {"koala_1b": (6, True), "koala_700m": (5, False)}  # SDXL students: blocks in the last stage, mid block kept
C_WIDTHS = {"c_base": 256, "c_small": 224, "c_tiny": 192, "c_micro": 160}  # base width, SD's is 320
# feature-KD layers of the official trainer: C-series (same names in teacher and student) and bk_tiny
C_LAYERS = (
    *[f"up_blocks.{i}.upsamplers.0.conv" for i in range(3)],
    "up_blocks.3.attentions.2.proj_out",
    "mid_block.attentions.0.proj_out",
    *[f"down_blocks.{i}.downsamplers.0.conv" for i in range(3)],
    "down_blocks.3.resnets.1.conv2",
)
BK_TINY_LAYERS = {  # student layer: teacher layer
    "down_blocks.0": "down_blocks.0",
    "down_blocks.1": "down_blocks.1",
    "down_blocks.2.attentions.0.proj_out": "down_blocks.2.attentions.1.proj_out",
    "up_blocks.0": "up_blocks.1",
    "up_blocks.1": "up_blocks.2",
    "up_blocks.2": "up_blocks.3",
}
VALIDATION_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a red sports car parked on a city street at night",
    "a bowl of fruit on a wooden table, oil painting",
    "a cat sitting in a field of flowers",
]
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

# -----------------------------------------------------------------------------
# config: one flat block; defaults are the paper's


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag ends like any other bad input: one line, exit status 1
        fail(message)


def number(kind, low, high=math.inf):
    """An argparse type: kind(text), refused outside [low, high] (nan included) before any slow work."""

    def convert(text: str):
        value = kind(text)
        if not low <= value <= high:
            bound = f"in [{low}, {high}]" if high < math.inf else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text} is not {bound}")
        return value

    convert.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return convert


COUNT, POSITIVE, WEIGHT, PROB = number(int, 0), number(int, 1), number(float, 0), number(float, 0, 1)


def parse_args(argv=None) -> argparse.Namespace:
    class Help(argparse.ArgumentDefaultsHelpFormatter):  # "(default: None)" says nothing: the help says it
        def _get_help_string(self, action):
            return action.help if action.default in (None, []) else super()._get_help_string(action)

    p = Parser(description=__doc__.split("\n\n")[1], formatter_class=Help)
    on_off = argparse.BooleanOptionalAction
    # models
    p.add_argument(
        "--teacher", default="CompVis/stable-diffusion-v1-4", help="SD v1/v2 or SDXL pipeline: hub id or folder"
    )
    p.add_argument("--student", default="bk_base", help=f"one of {', '.join(STUDENTS)}, or a UNet config.json")
    p.add_argument("--init", choices=["teacher", "random"], help="default: teacher for bk_* and koala_*, else random")
    # paired data: a latent cache, built from prompts (image-free) or from captioned images when missing
    p.add_argument("--data", required=True, help="latent cache folder (built here when it has no meta.json)")
    p.add_argument("--prompts", help="text file, one prompt a line: the teacher generates the latents")
    p.add_argument("--images", help="folder of images with metadata.jsonl or metadata.csv (file_name,text)")
    p.add_argument("--shard-size", type=POSITIVE, default=4096, help="samples per cache shard file")
    p.add_argument("--gen-steps", type=POSITIVE, default=25, help="teacher sampling steps for --prompts")
    p.add_argument("--gen-guidance", type=WEIGHT, default=7.5, help="classifier-free guidance for --prompts")
    # random conditioning
    p.add_argument("--text-pool", nargs="+", default=[], help="prompt files added to the pool of paired captions")
    p.add_argument("--random-conditioning", action=on_off, default=True, help="off: plain distillation")
    p.add_argument("--rc-schedule", choices=SCHEDULES, default="exp", help="p(t) schedule")
    p.add_argument(
        "--rc-lambda", type=WEIGHT, help="lambda in p(t) = exp(-lambda (1 - t/T)); default 5 where p(t) reads it"
    )
    p.add_argument("--null-prob", type=PROB, default=0.1, help="probability of the empty caption (for CFG)")
    # optimisation
    p.add_argument("--resolution", type=POSITIVE, help="training resolution in pixels; default: the teacher's")
    p.add_argument("--max-steps", type=COUNT, default=50_000, help="optimizer steps (0: build the cache and stop)")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="per device, per micro-step")
    p.add_argument("--total-batch-size", type=POSITIVE, default=256, help="samples per optimizer step, all devices")
    p.add_argument("--lr", type=WEIGHT, default=5e-5, help="AdamW learning rate, constant after the warm-up")
    p.add_argument("--warmup-steps", type=COUNT, default=0, help="linear lr warm-up steps")
    p.add_argument("--weight-decay", type=WEIGHT, default=1e-2, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=WEIGHT, default=1.0, help="gradient clipping of the student UNet")
    p.add_argument("--lambda-out", type=WEIGHT, default=1.0, help="output KD weight")
    p.add_argument("--lambda-feat", type=WEIGHT, default=1.0, help="feature KD weight")
    p.add_argument("--lambda-task", type=WEIGHT, default=0.0, help="denoising loss weight, paired samples only")
    p.add_argument("--lambda-rel", type=WEIGHT, default=0.0, help="relational KD weight (RDD)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="fp16", help="autocast on CUDA")
    p.add_argument("--gradient-checkpointing", action=on_off, default=True, help="less memory, ~1/3 more compute")
    p.add_argument("--ema", action=on_off, default=True, help="keep an EMA of the student (exported in unet/)")
    p.add_argument("--ema-decay", type=PROB, default=0.9999, help="EMA decay, with diffusers' warm-up")
    p.add_argument("--compile", action="store_true", help="torch.compile the resnet and transformer blocks")
    # output
    p.add_argument("--output-dir", required=True, help="pipeline, checkpoints/, log.jsonl, samples/")
    p.add_argument("--checkpoint-every", type=POSITIVE, default=1000, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=POSITIVE, default=2, help="how many of the latest checkpoints to keep")
    p.add_argument("--resume", nargs="?", const="latest", help="'latest' in --output-dir, or a checkpoint file")
    p.add_argument("--overwrite", action="store_true", help="start anew in an --output-dir that holds a run")
    p.add_argument("--seed", type=COUNT, default=1234, help="seeds the student init, the data order and every draw")
    p.add_argument("--log-every", type=POSITIVE, default=10, help="steps between log lines (and NaN checks)")
    p.add_argument("--validate-every", type=COUNT, default=1000, help="steps between validation grids (0: never)")
    p.add_argument("--validation-steps", type=POSITIVE, default=25, help="sampling steps of the validation grid")
    p.add_argument("--threads", type=COUNT, default=0, help="CPU threads per process (0: torch's choice)")
    return p.parse_args(argv)


def fail(message: str):
    """Bad input or damaged state: one line (rank 0 speaks for all), exit status 1, no traceback."""
    raise SystemExit(f"error: {message}" if int(os.environ.get("RANK", 0)) == 0 else 1)


def check_args(args, world_size: int) -> tuple[int, tuple[str, list] | None]:
    """Multi-flag and file checks before slow work. Returns (grad accumulation, ("prompts"|"images", list) or None)."""
    per_step = args.batch_size * world_size
    if args.total_batch_size % per_step:
        fail(f"--total-batch-size {args.total_batch_size} is not a multiple of --batch-size x processes = {per_step}")
    if args.student not in STUDENTS and not Path(args.student).exists():
        fail(f"unknown --student {args.student!r}; use one of {', '.join(STUDENTS)} or a path to a UNet config.json")
    check_teacher(args.teacher)
    if args.rc_lambda is not None and (args.rc_schedule == "sigmoid" or not args.random_conditioning):
        fail("--rc-lambda is not read by this p(t) (--rc-schedule sigmoid, or --no-random-conditioning); leave it out")
    args.rc_lambda = 5.0 if args.rc_lambda is None else args.rc_lambda
    try:  # each pool file on its own, now: an empty or wrong one would otherwise surface after the cache build
        for f in args.text_pool:
            TextPool(Path(f))
    except (OSError, ValueError) as e:
        fail(f"--text-pool: {e}")
    writable(Path(args.output_dir), "--output-dir")
    data, built = Path(args.data), (Path(args.data) / "meta.json").is_file()
    if args.prompts and args.images:
        fail("pass --prompts or --images, not both")
    if not (args.prompts or args.images or built):
        fail(f"{data} holds no latent cache (meta.json); pass --prompts FILE or --images DIR to build it")
    source = ("prompts", read_lines(args.prompts)) if args.prompts else None
    source = ("images", read_image_captions(args.images)) if args.images else source
    if not built:
        writable(data, "--data")
    out = Path(args.output_dir)  # one run per folder: a second one would interleave its log and checkpoints
    if ((out / "checkpoints").exists() or (out / "log.jsonl").exists()) and not (args.resume or args.overwrite):
        fail(f"{out} holds a run (checkpoints/, log.jsonl); continue it with --resume, or use a new --output-dir")
    if args.overwrite and not args.resume and int(os.environ.get("RANK", 0)) == 0:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "log.jsonl").unlink(missing_ok=True)
    return args.total_batch_size // per_step, source


CREATED = []  # folders this run made, deepest first: removed at its end if they are still empty


def writable(folder: Path, flag: str) -> None:
    try:
        CREATED.extend(p for p in (folder, *folder.parents) if not p.exists())
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        fail(f"{flag} {folder} is not a writable folder ({e.strerror or e}); choose another")


def check_teacher(name: str) -> None:
    """A --teacher that is neither a folder here nor to be had from the hub, said in one line before slow work."""
    from huggingface_hub import constants, errors, model_info, try_to_load_from_cache

    # a hub id is namespace/name; "./x", "/x", "a/b/c", or "runs/tiny_sdd" beside a folder runs/ is a path
    if not Path(name).is_dir() and (name.count("/") != 1 or name[0] in "./~" or Path(name).parent.is_dir()):
        fail(f"--teacher {name}: folder not found")
    try:
        if Path(name).is_dir() or isinstance(try_to_load_from_cache(name, "model_index.json"), str):
            return
        model_info(name, timeout=20)
    except Exception as e:  # not on the hub, offline, or a network error of whichever HTTP client the hub uses
        why = f"is unreachable ({' '.join(str(e).split())})"
        why = "is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else why
        why = "has no such model" if isinstance(e, errors.RepositoryNotFoundError) else why
        fail(f"--teacher {name}: not a folder here, not in the local hub cache, and the hub {why}")


# captions over 77 tokens are cut as in SD's own training; the rest the user cannot act on either
HIDDEN = ("truncated because CLIP", "Token indices sequence length", "requires torchvision", "kept in float32")
SEEN = set()


def once(record: logging.LogRecord) -> bool:
    """A logging filter: each library message at most once, on rank 0 only, and none in HIDDEN."""
    message = record.getMessage()
    show = message not in SEEN and not any(h in message for h in HIDDEN) and int(os.environ.get("RANK", 0)) == 0
    SEEN.add(message)
    return show


def quiet_libraries() -> None:
    import diffusers
    import transformers

    if int(os.environ.get("RANK", 0)) > 0:  # one console: rank 0 speaks for all
        warnings.simplefilter("ignore")
    for library in (diffusers, transformers):
        library.utils.logging.disable_progress_bar()
        for handler in logging.getLogger(library.__name__).handlers:
            handler.addFilter(once)  # added once however often this runs


# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without it, one process


def setup_ddp() -> tuple[bool, int, int, int, torch.device]:
    if "RANK" not in os.environ:
        return False, 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Building the cache makes ranks wait on each other for up to one shard; allow that, not forever.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return True, rank, local_rank, world_size, device


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# teacher and students


def load_models(teacher: str, student: str, init: str | None, dtype: torch.dtype, device: torch.device):
    """(teacher pipeline, student UNet in fp32, {student layer: teacher layer}). The student copies the teacher's fp32
    weights before the frozen teacher is cast to dtype (as in BK-SDM: copied cast weights would start it rounded)."""
    from diffusers import DiffusionPipeline, PNDMScheduler

    try:
        kind = DiffusionPipeline.load_config(teacher).get("_class_name")
        if kind not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
            raise ValueError(f"it holds a {kind}")
        xl = kind == "StableDiffusionXLPipeline"
        if student in STUDENTS and student.startswith("koala_") != xl:
            fail(f"--student {student} does not fit a {kind} teacher; koala_* students need SDXL, the others SD v1/v2")
        pipe = DiffusionPipeline.from_pretrained(teacher, **({} if xl else NO_SAFETY_CHECKER))
    except (OSError, ValueError, TypeError) as e:
        why = str(e).strip().splitlines()[0]
        fail(f"--teacher {teacher} is not a loadable diffusers Stable Diffusion or SDXL pipeline: {why}")
    if family(pipe) == "sd":  # SD: the paper's sampler, for the cache and the grids; SDXL keeps its own
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    unet, layers = build_student(pipe.unet, student, init)
    for m in pipe.components.values():
        if isinstance(m, nn.Module):
            m.requires_grad_(False).eval().to(device, dtype)
    if pipe.vae.config.get("force_upcast"):  # SDXL's VAE overflows in float16: it encodes and decodes in fp32
        pipe.vae.float()
    return pipe, unet.to(device), layers


def family(pipe) -> str:
    return "sdxl" if "text_encoder_2" in pipe.components else "sd"


def encode_text(pipe, captions: list[str], resolution: int) -> dict:
    """The UNet's conditioning, by the pipeline's own encode_prompt; SDXL adds the pooled text and the time ids of a
    square image at the training resolution; "" is zeros where sampling uses zeros (force_zeros_for_empty_prompt)."""
    device = pipe.unet.device
    if family(pipe) == "sd":
        return dict(encoder_hidden_states=pipe.encode_prompt(captions, device, 1, do_classifier_free_guidance=False)[0])
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
    if pipe.config.get("force_zeros_for_empty_prompt"):
        keep = torch.tensor([c != "" for c in captions], device=device)
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(captions), device=device)
    added = dict(text_embeds=pooled, time_ids=time_ids.to(embeds.dtype))
    return dict(encoder_hidden_states=embeds, added_cond_kwargs=added)


def student_config(teacher_config: dict, name: str) -> dict:
    """Derive a student UNet config from the teacher's, so SD v2 and non-512 teachers work too."""
    cfg = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    n_blocks = len(cfg["block_out_channels"])
    if name in KOALA:  # one resnet per stage, fewer transformer blocks in the last stage and the mid block
        depth, mid = KOALA[name]
        cfg["layers_per_block"] = 1
        cfg["transformer_layers_per_block"] = [*cfg["transformer_layers_per_block"][:-1], depth]
        cfg["mid_block_type"] = cfg["mid_block_type"] if mid else None
    elif name.startswith("bk_"):
        cfg["layers_per_block"] = 1  # one resnet (+ attention) per stage instead of two
        if name in ("bk_small", "bk_tiny"):
            cfg["mid_block_type"] = None
        if name == "bk_tiny":  # drop the lowest-resolution stage: the first up stage, the last down stage
            cfg["up_block_types"] = list(cfg["up_block_types"])[1:]
            # the other per-stage lists, down_block_types too, are indexed by down stage (up stages read them
            # reversed), so dropping the last entry keeps every surviving stage's settings
            for key, value in cfg.items():
                if isinstance(value, (list, tuple)) and len(value) == n_blocks:
                    cfg[key] = list(value)[:-1]
    else:
        scale, groups = C_WIDTHS[name] / 320, cfg["norm_num_groups"]
        widths = [max(groups, round(c * scale / groups) * groups) for c in cfg["block_out_channels"]]
        cfg["block_out_channels"] = widths
        # diffusers SD configs store the number of heads in attention_head_dim; keep it if it divides
        key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
        heads = cfg[key] if isinstance(cfg[key], (list, tuple)) else [cfg[key]] * n_blocks
        cfg[key] = [max(h for h in range(1, hd + 1) if w % h == 0) for w, hd in zip(widths, heads)]
    return cfg


def teacher_name(student_param: str, student: str) -> str:
    """The teacher parameter a block-pruned student parameter is copied from (BK-SDM's mapping, also
    KOALA's). An attention with fewer transformer blocks keeps the teacher's first ones (same names)."""
    parts = student_param.split(".")
    if parts[0] == "up_blocks":
        if student == "bk_tiny":  # the first up stage is gone: student stage k is teacher stage k+1
            parts[1] = str(int(parts[1]) + 1)
        if parts[2] in ("resnets", "attentions") and parts[3] == "1":  # up stages keep layers 0 and 2
            parts[3] = "2"
    return ".".join(parts)


def build_student(teacher_unet: nn.Module, spec: str, init: str | None):
    """(student UNet in fp32, {student layer: teacher layer} for feature KD)."""
    from diffusers import UNet2DConditionModel

    if spec in STUDENTS:
        cfg = student_config(teacher_unet.config, spec)
    else:
        path = Path(spec) if Path(spec).is_file() else Path(spec, "config.json")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            fail(f"--student {spec}: not a readable UNet config.json ({e})")
    init = init or ("random" if spec in C_WIDTHS or spec not in STUDENTS else "teacher")
    student = UNet2DConditionModel.from_config(cfg)
    if init == "teacher":
        if spec in C_WIDTHS:
            fail(f"--student {spec} is narrower than the teacher and cannot copy its weights; use --init random")
        t_state, s_state = teacher_unet.state_dict(), student.state_dict()
        src = {k: teacher_name(k, spec) if spec in STUDENTS else k for k in s_state}  # student name: teacher name
        state = {k: t_state[t].float() for k, t in src.items() if t in t_state and t_state[t].shape == s_state[k].shape}
        missing = [k for k in s_state if k not in state]
        if spec in STUDENTS and missing:  # our own derivation must map every weight
            raise RuntimeError(f"teacher init left {len(missing)} student weights unmapped, e.g. {missing[:3]}")
        student.load_state_dict(state, strict=False)
        if missing:
            print0(f"teacher init: {len(state)} tensors copied by name, {len(missing)} left random")
    if spec == "bk_tiny":
        layers = BK_TINY_LAYERS
    elif spec in KOALA:  # every kept transformer block's self-attention, the first downsampler, the last resnet
        names = [n for n, _ in student.named_modules() if n.endswith(".attn1")]
        names += ["down_blocks.0.downsamplers.0.conv", f"up_blocks.{len(student.up_blocks) - 1}.resnets.1.conv2"]
        layers = {name: teacher_name(name, spec) for name in names}
    elif spec in C_WIDTHS:
        layers = {name: name for name in C_LAYERS}
    else:  # stage outputs, as published for bk_base / bk_small
        n = {b: min(len(getattr(student, b)), len(getattr(teacher_unet, b))) for b in ("down_blocks", "up_blocks")}
        layers = {f"{b}.{i}": f"{b}.{i}" for b, n_b in n.items() for i in range(n_b)}
    return student, layers


class Student(nn.Module):
    """What DDP wraps: the student UNet and its 1x1 feature projections, so one forward uses every trainable weight."""

    def __init__(self, args, pipe, unet: nn.Module, layers: dict, latent_shape: tuple, cond: dict, autocast):
        super().__init__()
        self.unet, self.distiller = unet, None
        self.feat, self.rel = args.lambda_feat > 0, args.lambda_rel > 0
        print0(f"teacher UNet {n_params(pipe.unet)} params, student {args.student} {n_params(unet)}")
        if self.feat or self.rel:
            x = torch.zeros(1, *latent_shape, device=unet.device)  # cond: one sample's conditioning
            try:
                self.distiller = FeatureDistiller(pipe.unet, unet, layers)
                if self.feat:  # a projection wherever student and teacher widths differ
                    with autocast:
                        self.distiller.probe(x, torch.tensor([1], device=x.device), **cond)
            except ValueError as e:
                fail(f"feature KD layers do not match: {e}; set --lambda-feat 0 --lambda-rel 0")
            proj = self.distiller.proj
            print0(f"feature KD on {len(layers)} layers, {len(proj)} projections ({n_params(proj)})")
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if args.compile:
            compile_blocks(unet, pipe.unet, layers)
        self.to(unet.device)

    def forward(self, noisy_latents, timesteps, **cond):  # cond: encoder_hidden_states (+ added_cond_kwargs)
        model_pred = self.unet(noisy_latents, timesteps, **cond).sample
        loss_rel = loss_kd_feat = model_pred.new_zeros((), dtype=torch.float32)
        if self.rel:  # before loss(), which clears the stored activations
            loss_rel = relational_kd_loss(*self.distiller.features())  # (student, teacher) lists
        if self.feat:
            loss_kd_feat = self.distiller.loss()
        elif self.distiller is not None:
            self.distiller.clear()
        return model_pred, loss_kd_feat, loss_rel


def compile_blocks(unet: nn.Module, teacher_unet: nn.Module, layers: dict) -> None:
    """Regional compilation: blocks that hold a hooked layer stay eager so hooks come and go freely. All
    blocks of a kind share one code object, and each width recompiles it: allow for that."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(cfg, limit, max(getattr(cfg, limit), 64))
    for model, hooked in ((unet, layers.keys()), (teacher_unet, layers.values())):
        for name, m in model.named_modules():
            holds_hook = any(h.startswith(name + ".") for h in hooked)
            if isinstance(m, (BasicTransformerBlock, ResnetBlock2D)) and not holds_hook:
                m.compile()


def n_params(m: nn.Module) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"


# -----------------------------------------------------------------------------
# paired data: latents in a few large .npy shards (memory-mapped) + captions, built when missing


def read_lines(path: str) -> list[str]:
    """Non-blank lines, split on newlines only (U+2028 inside a web caption is not a line break)."""
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        fail(f"--prompts {path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        fail(f"--prompts {path}: line {line} is not UTF-8; convert the file (e.g. iconv -t UTF-8)")
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        fail(f"--prompts {path} has no prompt (one per line)")
    return lines


def read_image_captions(folder: str) -> list[tuple[str, str]]:
    """[(file name relative to folder, caption)] from metadata.jsonl or metadata.csv (file_name,text)."""
    root = Path(folder)
    try:
        if (root / "metadata.jsonl").is_file():
            lines = (root / "metadata.jsonl").read_text(encoding="utf-8").split("\n")
            rows = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        elif (root / "metadata.csv").is_file():
            with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
                rows = list(enumerate(csv.DictReader(f), 2))  # line 1 is the header
        else:
            fail(f"--images {folder} needs metadata.jsonl or metadata.csv with file_name,text")
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        fail(f"--images {folder}: cannot read its metadata ({e})")
    items = []
    for n, row in rows:
        try:
            row = json.loads(row) if isinstance(row, str) else row
            if not (isinstance(row["file_name"], str) and isinstance(row["text"], str)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            fail(f"--images {folder}: metadata line {n} is not a record with a file_name and a text")
        items.append((row["file_name"], row["text"]))
    if not items:
        fail(f"--images {folder}: the metadata lists no image")
    missing = [f for f, _ in items if not (root / f).is_file()]
    if missing:
        fail(f"--images: {len(missing)} listed images are missing, e.g. {root / missing[0]}")
    return items


def atomic_save(path: Path, content) -> None:
    """content (text, or a function writing a binary file) to a synced file renamed over path: never half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")  # unique across ranks and hosts
    with open(tmp, "wb") as f:
        if isinstance(content, str):
            f.write(content.encode())
        else:
            content(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_cache(args, source, pipe, resolution: int, latent_shape: tuple, rank: int, world_size: int) -> "LatentCache":
    """Refuse a cache made from another list; build a missing one in shards split across ranks (resumable); open it."""
    data = Path(args.data)
    if source is not None:
        kind, items = source
        digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()
        made = {"source": kind, "list_sha256": digest, "teacher": args.teacher, "family": family(pipe)}
        made |= {"resolution": resolution, "shard_size": args.shard_size}
        if kind == "prompts":  # what the cached latents are a function of
            made |= {"gen_steps": args.gen_steps, "gen_guidance": args.gen_guidance, "seed": args.seed}
        done = (data / "meta.json").is_file()
        record = data / ("meta.json" if done else "build.json")  # build.json: written when a build starts
        try:
            have = json.loads(record.read_text()) if record.is_file() else made
        except ValueError:
            fail(f"cache {data}: {record.name} is unreadable; delete it (finished shards are kept) and rerun")
        differ = [k for k, v in made.items() if k != "source" and have.get(k) != v]
        if differ:
            flags = ", ".join("--prompts/--images list" if k == "list_sha256" else f"--{k}" for k in differ)
            todo = "drop --prompts/--images to train on it as it is" if done else "delete it"
            fail(f"cache {data} was made with a different {flags.replace('_', '-')}; {todo}, or use a new --data")
        if not done:
            captions = items if kind == "prompts" else [c for _, c in items]
            if rank == 0 and not (data / "build.json").is_file():
                atomic_save(data / "build.json", json.dumps(made, indent=1))
            n_shards = math.ceil(len(items) / args.shard_size)
            mine = [k for k in range(rank, n_shards, world_size) if not (data / f"latents-{k:05d}.npy").is_file()]
            print0(f"latent cache: {len(items)} {kind}, {n_shards} shards, {len(mine)} to build on rank 0")
            for k in tqdm(mine, desc="cache", disable=rank != 0):
                lo, hi = k * args.shard_size, min(len(items), (k + 1) * args.shard_size)
                latents = encode_shard(items[lo:hi], kind, pipe, args, resolution, lo)
                atomic_save(data / f"captions-{k:05d}.json", json.dumps(captions[lo:hi]))
                atomic_save(data / f"latents-{k:05d}.npy", lambda f, latents=latents: np.save(f, latents))
            if dist.is_initialized():
                dist.barrier()  # every shard is on disk
            if rank == 0:
                # the paired captions join the text pool as published: one per line, newlines flattened
                atomic_save(data / "captions.txt", "".join(" ".join(c.split()) + "\n" for c in captions))
                shape = {"num_samples": len(items), "num_shards": n_shards, "latent_shape": list(latent_shape)}
                atomic_save(data / "meta.json", json.dumps(made | shape, indent=1))
                (data / "build.json").unlink(missing_ok=True)  # meta.json now says it all
            if dist.is_initialized():
                dist.barrier()
    cache = LatentCache(data)
    meta, fam = cache.meta, family(pipe)
    have = (meta.get("family", "sd"), meta["resolution"], tuple(meta["latent_shape"]))  # "sd": made before SDXL
    if have != (fam, resolution, latent_shape):  # never train one family on the other's latents
        fix = f"set --resolution {meta['resolution']} or use a new --data" if have[0] == fam else "use a new --data"
        made = f"cache {data} holds {have[0]} latents of shape {have[2]} at {have[1]}px"
        fail(f"{made}; the {fam} teacher at {resolution}px needs {latent_shape}; {fix}")
    print0(f"paired data: {len(cache)} cached latents {latent_shape} from {cache.meta['source']}")
    return cache


@torch.no_grad()
def encode_shard(items, kind, pipe, args, resolution, start: int) -> np.ndarray:
    """Latents (n, 4, h, w) float16 for one shard: teacher samples for prompts, VAE means for images."""
    from PIL import Image, ImageOps

    device, out = pipe.unet.device, []
    sampling = dict(height=resolution, width=resolution, num_inference_steps=args.gen_steps, output_type="latent")
    for i in range(0, len(items), args.batch_size):
        batch = items[i : i + args.batch_size]
        if kind == "prompts":
            # one fixed seed per prompt (seed + its index), so the cache does not depend on sharding
            gens = [torch.Generator(device).manual_seed(args.seed + start + i + j) for j in range(len(batch))]
            latents = pipe(batch, **sampling, guidance_scale=args.gen_guidance, generator=gens).images
        else:
            images = [Image.open(Path(args.images) / file).convert("RGB") for file, _ in batch]
            # the largest centred square, resized to the training resolution
            images = [np.array(ImageOps.fit(img, (resolution, resolution), Image.BICUBIC)) for img in images]
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device, pipe.vae.dtype) / 127.5 - 1
            # the posterior mean: its std is tiny for SD's VAE, and a cache should not freeze one noise draw
            latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        out.append(latents.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


class LatentCache:
    """Memory-mapped latents (float16 .npy shards) and their captions."""

    def __init__(self, data: Path):
        rebuild = "rerun with the same --prompts/--images to rebuild it"
        try:
            self.meta = json.loads((data / "meta.json").read_text())
        except (OSError, ValueError) as e:
            fail(f"cache {data}: meta.json is unreadable ({e}); delete it and {rebuild}")
        self.latents, self.captions = [], []
        for k in range(self.meta["num_shards"]):
            try:
                latents = np.load(data / f"latents-{k:05d}.npy", mmap_mode="r")
                captions = json.loads((data / f"captions-{k:05d}.json").read_text())
                if len(latents) != len(captions):
                    raise ValueError(f"{len(latents)} latents for {len(captions)} captions")
            except (OSError, ValueError) as e:
                problem = f"shard {k} is missing or damaged ({str(e).strip().splitlines()[0]})"
                fail(f"cache {data}: {problem}; delete latents-{k:05d}.npy and meta.json, then {rebuild}")
            self.latents.append(latents)
            self.captions += captions
        self.starts = np.cumsum([0] + [len(x) for x in self.latents])
        if self.starts[-1] != self.meta["num_samples"] or len(self.captions) == 0:
            fail(f"cache {data} is empty or inconsistent with its meta.json; delete it and rebuild")

    def __len__(self) -> int:
        return len(self.captions)

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        latents = np.stack([self.latents[k][i - self.starts[k]] for k, i in zip(shards, indices)])
        return torch.from_numpy(latents), [self.captions[i] for i in indices]


class ShardedSampler:
    """Batch b of this rank is a pure function of (seed, epoch, rank, b): one permutation per epoch,
    shared by all ranks, cut into equal disjoint slices by global rank. Resuming needs only the count."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.per_rank = n // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            fail(f"the cache holds {n} samples, fewer than {world_size} ranks x --batch-size {batch_size}")
        self.n, self.batch_size, self.rank, self.seed, self._epoch, self._mine = n, batch_size, rank, seed, -1, None

    def batch(self, b: int) -> np.ndarray:
        epoch, i = divmod(b, self.batches_per_epoch)
        if epoch != self._epoch:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
            self._epoch, self._mine = epoch, perm[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        return self._mine[i * self.batch_size : (i + 1) * self.batch_size]


def draw_generator(seed: int, rank: int, world_size: int, micro_step: int) -> torch.Generator:
    """The CPU random stream of one (seed, global rank, micro-step): the same draws on every accelerator. torch's CPU
    generator (mt19937) keeps 32 bits of its seed: hashed seeds would collide after some 10^5 streams (birthday bound).
    Numbered from a start scrambled from --seed, no stream repeats under 2^32 rank-micro-steps; resume replays them."""
    start = int(np.random.SeedSequence(seed).generate_state(1)[0])
    return torch.Generator().manual_seed((start + micro_step * world_size + rank) % 2**32)


# -----------------------------------------------------------------------------
# checkpoints, validation, export


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be trusted, or None: its bytes must match the checksum written beside it."""
    if not path.is_file():
        return "not found"
    try:
        info = json.loads(Path(f"{path}.json").read_text())
        size, digest = info["bytes"], info["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {path.name}.json (its checksum) beside it"
    if path.stat().st_size != size:
        return f"{path.stat().st_size} bytes instead of {size}, truncated"
    if sha256_of(path) != digest:
        return "its bytes do not match its sha256 checksum"
    return None


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run_identity(args, world_size: int) -> dict:
    """What a checkpoint records and its resume must share: another split of the batch draws other samples."""
    flags = {"--student": args.student, "--batch-size": args.batch_size, "--total-batch-size": args.total_batch_size}
    return flags | {"processes": world_size}


def find_checkpoint(args, world_size: int) -> Path:
    """The named checkpoint, or the newest intact one in --output-dir (a damaged one is named, never trained on)."""
    folder = Path(args.output_dir) / "checkpoints"
    named = args.resume != "latest"
    for path in [Path(args.resume)] if named else sorted(folder.glob("step-*.pt"), reverse=True):
        if (problem := checkpoint_problem(path)) is None:
            break
        if named:
            fail(f"--resume {path}: {problem}; resume from another checkpoint")
        print0(f"checkpoint {path} is damaged ({problem}); skipping it")
    else:
        fail(f"--resume: no intact checkpoint in {folder}; start without --resume or in a new --output-dir")
    written = json.loads(Path(f"{path}.json").read_text())
    for flag, value in run_identity(args, world_size).items():
        if written.get(flag) != value:
            fail(f"{path} was written with {flag} {written.get(flag)}, this run has {value}; resume with the same")
    return path


def export(pipe, unet, ema_params, args, out: Path) -> None:
    """unet/ (EMA weights when EMA is on, as BK-SDM publishes; raw ones in unet_no_ema/) in the teacher's pipeline,
    which DiffusionPipeline.from_pretrained loads. Written beside, then moved in: a crash leaves an older one intact."""
    from diffusers import UNet2DConditionModel

    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final = UNet2DConditionModel.from_config(unet.config)  # a clean copy: no hooks, compile or checkpointing
    final.load_state_dict({k: v.float().cpu() for k, v in unet.state_dict().items()})
    if ema_params is not None:
        final.save_pretrained(tmp / "unet_no_ema")
        for p, e in zip(final.parameters(), ema_params):
            p.data.copy_(e)
    extra = NO_SAFETY_CHECKER if family(pipe) == "sd" else {}
    type(pipe).from_pretrained(args.teacher, unet=final, **extra).save_pretrained(tmp)
    for item in sorted(tmp.iterdir()):
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


# -----------------------------------------------------------------------------
# training: setup (checks first), resume, one step, checkpoint, the loop


class Trainer:
    """One run: __init__ the setup (the checks that need no model first), step() one optimizer step, fit() the loop."""

    def __init__(self, args, ddp: bool, rank: int, world_size: int, device: torch.device):
        self.args, self.ddp, self.rank, self.world_size, self.device = args, ddp, rank, world_size, device
        self.out = Path(args.output_dir)
        self.grad_accum, source = check_args(args, world_size)
        resume = find_checkpoint(args, world_size) if args.resume else None
        cuda = device.type == "cuda"
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision) if cuda else None
        self.autocast = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(args.seed)  # same on every rank: identical student init and projections

        # --- models and paired data
        self.pipe, unet, layers = load_models(args.teacher, args.student, args.init, dtype or torch.float32, device)
        vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        self.resolution = args.resolution or self.pipe.unet.config.sample_size * vae_scale
        multiple = vae_scale * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)  # each UNet stage halves
        if self.resolution % multiple:
            fail(f"--resolution {self.resolution} must be a multiple of {multiple}")
        latent_shape = (self.pipe.unet.config.in_channels, self.resolution // vae_scale, self.resolution // vae_scale)
        self.cache = open_cache(args, source, self.pipe, self.resolution, latent_shape, rank, world_size)
        if args.max_steps == 0:
            return  # the cache is built: nothing to train
        self.sampler = ShardedSampler(len(self.cache), args.batch_size, rank, world_size, args.seed)
        try:  # every rank draws from the whole pool with its own stream: the same distribution as a split
            pool = TextPool([Path(args.data) / "captions.txt"] + [Path(f) for f in args.text_pool])
        except (OSError, ValueError) as e:
            fail(f"text pool: {e}")
        print0(f"text pool: {len(pool)} prompts, each rank drawing from all of them")
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)  # q(x_t | x_0)
        schedule = args.rc_schedule if args.random_conditioning else "none"
        T = self.noise_scheduler.config.num_train_timesteps
        self.conditioner = RandomConditioner(pool, T, schedule=schedule, lam=args.rc_lambda, null_prob=args.null_prob)

        # --- student, optimizer, EMA, resume, DDP
        example = self.encode([""])  # one sample's conditioning, for the projections' probe
        self.student = self.model = Student(args, self.pipe, unet, layers, latent_shape, example, self.autocast)
        params = [p for p in self.student.parameters() if p.requires_grad]
        kernel = {"fused": True} if cuda else {"foreach": True}  # one kernel, not one per tensor
        adamw = dict(lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
        self.optimizer = torch.optim.AdamW(params, **adamw, **kernel)
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        self.weights = [p.detach() for p in unet.parameters()]  # views: they follow the in-place updates
        self.ema = [w.clone().float() for w in self.weights] if args.ema else None
        self.step_count, self.logged = 0, {}  # logged: each loss term summed since the last log line
        if resume:
            self.load(resume)
        if ddp:
            # gradients as views into the reduction buckets: no second copy of them (4 bytes a parameter)
            self.model = DDP(self.student, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True)
        if rank == 0:
            ran = {"device": device.type, "processes": world_size, "threads": torch.get_num_threads()}
            ran["precision"] = args.mixed_precision if dtype else "fp32"  # CPU, or --mixed-precision no
            (self.out / "args.json").write_text(json.dumps(vars(args) | {"ran": ran}, indent=1))
        batch = f"{world_size} processes x batch {args.batch_size} x {self.grad_accum} accumulation"
        print0(f"{batch} = {args.total_batch_size} per step, {args.max_steps} steps on {device.type}, autocast {dtype}")

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict:
        with self.autocast:
            return encode_text(self.pipe, captions, self.resolution)

    def draw_batch(self, micro_step: int) -> dict:
        """Everything random in one micro-step, on the CPU, from this (rank, micro-step)'s own stream."""
        g = draw_generator(self.args.seed, self.rank, self.world_size, micro_step)
        indices = self.sampler.batch(micro_step)
        latents, captions = self.cache.get(indices)  # (B, 4, h, w) float16
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(indices),), generator=g)
        captions, paired = self.conditioner(captions, timesteps, generator=g)  # swap with p(t), then null-drop
        noise = torch.randn(latents.shape, generator=g)
        return dict(
            indices=indices, latents=latents, captions=captions, paired=paired, timesteps=timesteps, noise=noise
        )

    def losses(self, micro_step: int) -> dict[str, torch.Tensor]:
        """One micro-step of distillation, all of it on this page. With x_0 a cached latent and c its caption:
            t ~ U{0, ..., T-1};  c <- a random pool caption with probability p(t), then "" with probability 0.1
            x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I)
            L = lambda_out |eps_S - eps_T|^2 + lambda_feat sum_l |P_l f_S^l - f_T^l|^2
                (+ lambda_task |eps_S - eps|^2 over paired samples + lambda_rel L_RDD)
        where eps_S, eps_T are the student's and the teacher's predictions on (x_t, t, c), f^l their features at
        the hooked layers l and P_l a projection where widths differ. Returns each term, L and the swap rate."""
        args, teacher = self.args, self.pipe.unet
        batch = self.draw_batch(micro_step)  # x_0, t, the selected captions, paired flags, eps: one CPU stream
        latents, noise, timesteps = (batch[k].to(self.device) for k in ("latents", "noise", "timesteps"))
        noisy_latents = self.noise_scheduler.add_noise(latents.float(), noise, timesteps)  # x_t
        cond = self.encode(batch["captions"])  # encoder_hidden_states (B, 77, D) (+ SDXL's added_cond_kwargs)
        # hooks on the feature layers of both models, live inside this block only
        with self.student.distiller if self.student.distiller is not None else contextlib.nullcontext():
            with torch.no_grad(), self.autocast:
                teacher_pred = teacher(noisy_latents, timesteps, **cond).sample  # eps_T, (B, 4, h, w)
            with self.autocast:  # the student (DDP-wrapped) computes its feature losses inside its own forward
                model_pred, loss_kd_feat, loss_rel = self.model(noisy_latents, timesteps, **cond)  # eps_S, ...
        loss_kd_out = output_kd_loss(model_pred, teacher_pred)
        paired = batch["paired"].to(self.device)
        loss_task = torch.zeros_like(loss_kd_out)
        if args.lambda_task > 0:  # the denoising loss, on the samples that kept their own caption
            target = noise  # epsilon prediction; SD 2 at 768 px predicts v
            if self.noise_scheduler.config.prediction_type == "v_prediction":
                target = self.noise_scheduler.get_velocity(latents.float(), noise, timesteps)
            per_sample = F.mse_loss(model_pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            loss_task = (per_sample * paired).sum() / paired.sum().clamp(min=1)
        loss = args.lambda_out * loss_kd_out + args.lambda_feat * loss_kd_feat
        loss = loss + args.lambda_task * loss_task + args.lambda_rel * loss_rel
        terms = dict(loss_kd_out=loss_kd_out, loss_kd_feat=loss_kd_feat, loss_task=loss_task, loss_rel=loss_rel)
        return dict(loss=loss, **terms, rc_swap_rate=1 - paired.float().mean())  # swap rate: share of pool captions

    def step(self) -> None:
        """One optimizer step of grad_accum micro-steps; adds the losses, swap rate and grad norm to self.logged."""
        args, step = self.args, self.step_count
        for group in self.optimizer.param_groups:  # linear warm-up, then constant
            group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for micro in range(self.grad_accum):
            # gradients are all-reduced once per optimizer step, in the last micro-step's backward
            with self.model.no_sync() if self.ddp and micro < self.grad_accum - 1 else contextlib.nullcontext():
                losses = self.losses(step * self.grad_accum + micro)
                self.scaler.scale(losses["loss"] / self.grad_accum).backward()
            for name, value in losses.items():
                self.logged[name] = self.logged.get(name, 0) + value.detach() / self.grad_accum
        self.scaler.unscale_(self.optimizer)
        # the UNet only, as in the official trainer: the 1x1 projections are not clipped
        grad_norm = torch.nn.utils.clip_grad_norm_(self.student.unet.parameters(), args.max_grad_norm)
        self.logged["grad_norm"] = self.logged.get("grad_norm", 0) + grad_norm.detach()  # inf: fp16 skipped a step
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:  # diffusers EMAModel's warm-up: decay = min(d, (1 + n) / (10 + n))
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(self.ema, self.weights, 1 - decay)
        self.step_count += 1

    def log(self, n_steps: int, seconds: float, bar) -> None:
        """One log.jsonl line: each logged value averaged over the last n_steps steps and the ranks."""
        step, values = self.step_count, torch.stack(list(self.logged.values()))
        if self.ddp:  # averaged over ranks, so every rank sees the same NaN and stops together
            # the handle is kept so that this thread, not gloo's, frees values (set after self.model: freed later)
            self.all_reduce = dist.all_reduce(values, async_op=True)
            self.all_reduce.wait()
        vals = self.last_logged = dict(zip(self.logged, (values / (n_steps * self.world_size)).tolist()))
        self.logged = {}
        if not all(math.isfinite(v) for k, v in vals.items() if k.startswith("loss")):
            bar.close()
            fix = "lower --lr or use --mixed-precision bf16"
            fail(f"loss is {vals['loss']} at step {step}; {fix} (checkpoints up to step {step - n_steps} are intact)")
        dt = seconds / n_steps
        lr = self.optimizer.param_groups[0]["lr"]  # the step's own: step() set it
        rec = {"step": step, **vals, "lr": lr, "step_time": dt, "samples_per_s": self.args.total_batch_size / dt}
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            terms = " | ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in vals.items())
            bar.write(f"step {step} | {terms} | lr {lr:.2e} | {dt:.3f} s/step")

    def save(self) -> None:
        """step-XXXXXXX.pt and its checksum beside it; then the oldest earlier ones beyond --keep-checkpoints go.
        A later one (damaged, or left by a resume from an earlier step) is neither counted nor deleted."""
        args, step, folder = self.args, self.step_count, self.out / "checkpoints"
        state = {"step": step, "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict()}
        state |= {"scaler": self.scaler.state_dict(), "ema": self.ema, "args": vars(args)}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:07d}.pt"
        atomic_save(path, lambda f: torch.save(state, f))
        info = {"step": step, "sha256": sha256_of(path), "bytes": path.stat().st_size}
        info |= run_identity(args, self.world_size)
        atomic_save(Path(f"{path}.json"), json.dumps(info, indent=1))
        older = [c for c in sorted(folder.glob("step-*.pt")) if c.name < path.name and Path(f"{c}.json").is_file()]
        for old in older[: max(0, len(older) - (args.keep_checkpoints - 1))]:
            Path(f"{old}.json").unlink()
            old.unlink()

    def load(self, path: Path) -> None:
        """Weights, optimizer, scaler, EMA, step: all an exact resume needs, as data and every draw follow the step."""
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        try:
            self.student.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            why = str(e).strip().splitlines()[0]
            fail(f"{path} does not fit this model ({why}); resume with the flags it was written with")
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:  # a run that had no EMA starts one from the resumed weights
            self.ema = [e.to(self.device) for e in ckpt["ema"]] if ckpt["ema"] else [w.clone() for w in self.weights]
        self.step_count = ckpt["step"]
        log = self.out / "log.jsonl"
        if self.rank == 0 and log.is_file():  # the steps after this checkpoint will be logged again
            kept = []
            for line in log.read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line cut by a kill
                    if json.loads(line)["step"] <= self.step_count:
                        kept.append(line + "\n")
            atomic_save(log, "".join(kept))
        print0(f"resumed from {path} at step {self.step_count}")

    @torch.no_grad()
    def validate(self) -> None:
        """The validation prompts, fixed seeds (grids compare across steps and runs), sampled as the export will be."""
        from PIL import Image

        pipe = type(self.pipe).from_pipe(self.pipe, unet=self.student.unet)
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator(self.device).manual_seed(self.args.seed + i) for i in range(len(VALIDATION_PROMPTS))]
        sampling = dict(height=self.resolution, width=self.resolution, num_inference_steps=self.args.validation_steps)
        with self.autocast:
            latents = pipe(VALIDATION_PROMPTS, **sampling, generator=gens, output_type="latent").images
        vae = pipe.vae  # decoded outside autocast, in the VAE's own dtype (float32 where fp16 overflows)
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        images = pipe.image_processor.postprocess(images, output_type="np")  # (N, H, W, 3) in [0, 1]
        grid = (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)  # a row of images
        path = self.out / "samples" / f"step-{self.step_count:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))

    def fit(self) -> None:
        args, t_last, since = self.args, time.time(), 0
        bar = tqdm(total=args.max_steps, initial=self.step_count, desc="train", disable=self.rank != 0)
        with StopSignals() as signals:
            while self.step_count < args.max_steps:
                self.step()
                since += 1
                bar.update(1)
                stop = signals.signum
                if self.ddp:  # a signal on any rank: every rank stops after this step (the handle kept as in log())
                    flag = torch.tensor([stop], device=self.device)
                    self.stop_reduce = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
                    self.stop_reduce.wait()
                    stop = int(flag.item())
                step, last = self.step_count, self.step_count == args.max_steps or stop > 0
                if step % args.log_every == 0 or step % args.checkpoint_every == 0 or last:
                    self.log(since, time.time() - t_last, bar)
                    t_last, since = time.time(), 0
                if self.rank == 0 and (step % args.checkpoint_every == 0 or last):
                    self.save()
                if self.rank == 0 and args.validate_every and (step % args.validate_every == 0 or last) and not stop:
                    self.validate()
                if stop:
                    bar.close()
                    if self.ddp:  # no rank exits before rank 0's checkpoint is on disk: torchrun would stop it
                        dist.barrier()
                    print0(f"interrupted at step {step}; continue with --resume")
                    raise SystemExit(128 + stop)  # the shell's code for death by that signal
        bar.close()


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (preemption) ask training to stop after the current step; a second one stops at
    once. One within a second of the first is the same one: torchrun forwards a terminal's Ctrl-C to its workers."""

    def __enter__(self):
        self.signum, self.first = 0, 0.0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum, self.first = signum, time.monotonic()
        elif time.monotonic() - self.first > 1:  # what the signal did before: KeyboardInterrupt, or death
            signal.signal(signum, self.previous[signum])
            signal.raise_signal(signum)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def summary(trainer: Trainer, seconds: float) -> None:
    """The closing lines: how far it went, the last logged losses, where the pipeline is and how to score it."""
    losses = getattr(trainer, "last_logged", {})  # none when a finished run is resumed
    terms = "".join(f" | {k.removeprefix('loss_')} {v:.4f}" for k, v in losses.items() if k.startswith("loss"))
    print0(f"done: step {trainer.step_count}, {datetime.timedelta(seconds=round(seconds))} in this run{terms}")
    out, size = trainer.out, f" --resolution {trainer.resolution}" if trainer.args.resolution else ""
    print0(f"student pipeline in {out}; score it (PROMPTS: e.g. MS-COCO 30K captions, REF: FID statistics):")
    print0(f"python evaluate.py --model {out}{size} --prompts PROMPTS --ref REF.npz --out-dir {out}_eval")


def train(args) -> nn.Module | None:
    """Build or open the cache, train, export. Returns the trained module (student UNet + projections)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp, rank, _, world_size, device = setup_ddp()
    quiet_libraries()
    try:
        trainer = Trainer(args, ddp, rank, world_size, device)
        if args.max_steps == 0:
            return None
        start = time.time()
        trainer.fit()
        if rank == 0:
            export(trainer.pipe, trainer.student.unet, trainer.ema, args, trainer.out)
            summary(trainer, time.time() - start)
        return trainer.student
    finally:
        while CREATED:  # a failed run leaves no empty folder of its own making behind
            with contextlib.suppress(OSError):  # not empty: kept
                CREATED.pop(0).rmdir()
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    train(parse_args())
