r"""
Generate images with a (compressed) Stable Diffusion model and score them: FID, Inception Score, CLIP score.

MS-COCO 30K as in the paper: 30K val2014 captions, 512 px, 25 steps, guidance 7.5, the pipeline's PNDM
scheduler, PNGs resized to 256 px; FID against all 40,504 val2014 images resized to 256x256.
Once, the reference statistics:
    python evaluate.py --ref val2014/ --ref-resize 256 --save-ref-stats coco_val2014_256.npz
Then each model (a pipeline folder, e.g. train.py's output), on one GPU or on 8 (the same images either way):
    python evaluate.py --model runs/bk_base --prompts mscoco_val2014_30k/metadata.csv \
        --ref coco_val2014_256.npz --out-dir runs/eval/bk_base
    torchrun --standalone --nproc_per_node=8 evaluate.py --model runs/bk_base ...same arguments...
Side by side:
    python evaluate.py --compare runs/eval/sd14/metrics.json runs/eval/bk_base/metrics.json

Prompt i gets its own generator seeded with seed + i, so an image depends neither on the batch size nor
on the number of processes. Images already in OUT/images are kept (the run is resumable); metrics are
computed from the PNGs on disk, so scoring never sees an image that did not survive a crash.
"""

import argparse
import csv
import datetime
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

# The paper's CLIP: OpenCLIP ViT-g/14 (laion2b_s34b_b88k); LAION publishes it in transformers format too.
DEFAULT_CLIP = "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenCLIP uses these for the LAION models as well
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}

# -----------------------------------------------------------------------------
# config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    # what to generate
    p.add_argument("--model", help="diffusers pipeline folder or hub id; omit to score the images in --out-dir")
    p.add_argument("--unet", help="student UNet folder (save_pretrained, or a folder holding unet/) used in --model")
    p.add_argument("--prompts", help="csv / jsonl with a text column, or txt with one prompt per line")
    p.add_argument("--prompt-column", help="column or key holding the prompt (default: text, caption or prompt)")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts (quick checks)")
    p.add_argument("--out-dir", help="images go to OUT/images, scores to OUT/metrics.json")
    p.add_argument("--name", help="label in tables (default: the --unet or --model name)")
    # how to generate (paper defaults)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=list(SCHEDULERS), help="default: the pipeline's own (PNDM for SD v1.4)")
    p.add_argument("--seed", type=int, default=1234, help="prompt i uses seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="per process, generation and feature extraction")
    p.add_argument("--resize", type=int, default=256, help="saved PNG size (0 keeps the generated size)")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp16", "bf16", "fp32"],
        default="auto",
        help="generation dtype; auto: fp16 on CUDA, fp32 on CPU (metrics always run in fp32)",
    )
    # how to score
    p.add_argument("--metrics", default="fid,is,clip", help="comma list of fid, is, clip; 'none' only generates")
    p.add_argument("--ref", help="FID reference: a folder of real images (one size) or a .npz with mu, sigma")
    p.add_argument("--save-ref-stats", help="save the statistics of the --ref folder to this .npz (reuse it as --ref)")
    p.add_argument(
        "--ref-resize",
        type=int,
        default=0,
        help="resize each --ref image to SxS first (bicubic, no crop, as BK-SDM prepares val2014); 0: as is",
    )
    p.add_argument("--inception-weights", help="local torch-fidelity Inception file (default: download by name)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="transformers CLIPModel hub id or local folder")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument(
        "--subset",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="also score the prompts listed in FILE (ids or exact texts, one per line); repeatable",
    )
    p.add_argument("--compare", nargs="+", metavar="METRICS_JSON", help="print metrics.json files side by side, exit")
    return p.parse_args(argv)


def fail(msg: str):
    raise SystemExit(f"error: {msg}")


# -----------------------------------------------------------------------------
# distributed setup: without torchrun the same code runs as one process


def setup_ddp() -> tuple[bool, int, int, int, torch.device]:
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ddp:
        # ranks can wait on each other for a long time (uneven generation, rank 0 scoring): generous timeout
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
    return ddp, rank, local_rank, world_size, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# prompts and subsets


def load_prompts(path: str, column: str | None = None) -> list[str]:
    """Prompt i is the i-th row (csv / jsonl) or non-empty line (txt); image i is OUT/images/{i:06d}.png."""
    file = Path(path)
    if not file.is_file():
        fail(f"prompt file {path} not found")
    if file.suffix in (".csv", ".jsonl"):
        if file.suffix == ".csv":
            with open(file, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in file.read_text(encoding="utf-8").split("\n") if line.strip()]
        keys = list(rows[0]) if rows else []
        col = column or next((k for k in ("text", "caption", "prompt") if k in keys), None)
        if rows and col not in keys:
            fail(f"{path} has no column {column or 'text, caption or prompt'} (it has {', '.join(keys)})")
        prompts = [str(r[col]) for r in rows]
    else:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not prompts:
        fail(f"no prompts in {path}")
    return prompts


def load_subset(spec: str, prompts: list[str]) -> tuple[str, list[int]]:
    """NAME=FILE -> (NAME, prompt indices). FILE lists prompt ids, or prompt texts (every occurrence counts)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not Path(path).is_file():
        fail(f"--subset {spec}: expected NAME=FILE with an existing file")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    if all(line.isdigit() for line in lines):
        ids = sorted({int(line) for line in lines})
        bad = [i for i in ids if i >= len(prompts)]
        if bad:
            fail(f"subset {name}: prompt id {bad[0]} out of range (there are {len(prompts)} prompts)")
    else:
        where: dict[str, list[int]] = {}
        for i, text in enumerate(prompts):
            where.setdefault(text, []).append(i)
        missing = [line for line in lines if line not in where]
        if missing:
            fail(f"subset {name}: {len(missing)} texts are not among the prompts, e.g. {missing[0]!r}")
        ids = sorted({i for line in lines for i in where[line]})
    if not ids:
        fail(f"subset {name}: {path} is empty")
    return name, ids


# -----------------------------------------------------------------------------
# generation


def load_pipeline(args, device: torch.device, dtype: torch.dtype):
    import diffusers
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    model = Path(args.model)
    if model.is_dir() and not args.unet and not (model / "unet" / "config.json").is_file():
        fail(f"{args.model} has no unet/ folder (pass a full pipeline, or --unet DIR)")
    kwargs = {}
    if args.unet:
        unet_dir = Path(args.unet)
        unet_dir = unet_dir / "unet" if (unet_dir / "unet" / "config.json").is_file() else unet_dir
        if not (unet_dir / "config.json").is_file():
            fail(f"--unet {args.unet}: no UNet config.json there (expected a save_pretrained UNet folder)")
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype)
    try:
        # the paper's evaluation turns the NSFW filter off: its black images would count in FID
        pipe = StableDiffusionPipeline.from_pretrained(
            args.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, **kwargs
        )
    except (OSError, ValueError) as e:
        fail(f"cannot load pipeline {args.model}: {str(e).splitlines()[0]}")
    if args.scheduler:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_record(out_dir: Path, prompts: list[str], settings: dict | None = None) -> dict:
    """OUT/generation.json keeps the settings and prompts the images were made with. A resumed run must use the
    same settings, and every run the same prompt for each image id (more or fewer prompts are fine)."""
    record = out_dir / "generation.json"
    old = json.loads(record.read_text()) if record.is_file() else {"settings": settings, "prompts": []}
    if changed := [k for k in settings or {} if old["settings"].get(k) != settings[k]]:
        fail(f"{out_dir} holds images made with other settings ({', '.join(changed)}); use another --out-dir")
    for i, (a, b) in enumerate(zip(old["prompts"], prompts)):
        if a != b:
            fail(f"image {i} in {out_dir} was made for the prompt {a!r}, not {b!r}; use another --out-dir")
    return {"settings": old["settings"], "prompts": prompts + old["prompts"][len(prompts) :]}


def save_png(image: Image.Image, path: Path):
    tmp = path.with_suffix(".tmp.png")  # a crash leaves a .tmp.png, never a truncated NNNNNN.png
    image.save(tmp)
    os.replace(tmp, path)


@torch.no_grad()
def generate(args, prompts: list[str], image_dir: Path, device: torch.device, dtype: torch.dtype):
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    pipe = load_pipeline(args, device, dtype)
    # everything that changes the pixels
    settings = {
        "model": args.model,
        "unet": args.unet,
        "scheduler": type(pipe.scheduler).__name__,
        "resolution": args.resolution,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "resize": args.resize,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
    }
    record = check_record(image_dir.parent, prompts, settings)
    # every rank lists the missing images before anyone writes, so all ranks split the same list
    todo = [i for i in range(len(prompts)) if not (image_dir / f"{i:06d}.png").is_file()]
    barrier()
    if rank == 0:
        write_json(image_dir.parent / "generation.json", record)
    mine = todo[rank::world_size]
    print0(
        f"generating {len(todo)} of {len(prompts)} images ({len(prompts) - len(todo)} already on disk) "
        f"on {world_size} process(es)"
    )
    for start in tqdm(range(0, len(mine), args.batch_size), desc="generate", disable=rank != 0):
        ids = mine[start : start + args.batch_size]
        # CPU generators: the same initial latents on any device, and one per prompt so batching does not matter
        generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i in ids]
        images = pipe(
            [prompts[i] for i in ids],
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generators,
        ).images
        for i, image in zip(ids, images):
            if args.resize:
                image = image.resize((args.resize, args.resize), Image.BICUBIC)  # PIL's default, as in BK-SDM
            save_png(image, image_dir / f"{i:06d}.png")
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier()


# -----------------------------------------------------------------------------
# feature extractors: Inception-v3 (FID, IS) and CLIP. Tests inject small ones with the same interface.


def load_inception(weights: str | None) -> nn.Module:
    """torch-fidelity's Inception-v3: the TensorFlow FID network (2015-12-05 weights) that torch-fidelity and
    pytorch-fid both use. Called on uint8 images (B, 3, H, W); returns (pool (B, 2048), logits_unbiased (B, 1008))."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:  # not installed, or a torchvision that does not match torch
        fail(
            f"FID/IS need torch-fidelity ({type(e).__name__}: {e}); `pip install torch-fidelity` with a torchvision "
            f"matching your torch, or pass --metrics clip"
        )
    if weights and not Path(weights).is_file():
        fail(f"--inception-weights {weights} not found")
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], weights)
    except Exception as e:
        fail(
            f"cannot load the Inception weights ({type(e).__name__}); offline, download "
            f"weights-inception-2015-12-05-6726825d.pth from the torch-fidelity releases and pass --inception-weights"
        )


class ClipScorer:
    """Cosine between CLIP image and text embeddings, per (image, prompt) pair.
    Preprocessing is OpenCLIP's: shorter side to image_size (bicubic), center crop, mean/std normalisation."""

    def __init__(self, model: nn.Module, tokenizer, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        self.model, self.tokenizer, self.image_size = model.eval(), tokenizer, image_size
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def load(cls, name: str, device: torch.device) -> "ClipScorer":
        from transformers import AutoTokenizer, CLIPModel
        from transformers.utils import cached_file

        if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
            fail(f"--clip-model {name}: no such folder")
        try:
            model = CLIPModel.from_pretrained(name, torch_dtype=torch.float32).to(device)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as e:
            fail(
                f"cannot load CLIP model {name} ({str(e).splitlines()[0]}); download it once with "
                f"`hf download {name}` or pass a local folder as --clip-model, or leave clip out of --metrics"
            )
        pre = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        pre = json.loads(Path(pre).read_text()) if pre else {}
        return cls(
            model,
            tokenizer,
            model.config.vision_config.image_size,
            pre.get("image_mean", OPENAI_CLIP_MEAN),
            pre.get("image_std", OPENAI_CLIP_STD),
        )

    def pixels(self, images: list[Image.Image]) -> Tensor:
        out = []
        for im in images:
            scale = self.image_size / min(im.size)
            w, h = max(self.image_size, round(im.width * scale)), max(self.image_size, round(im.height * scale))
            im = im.resize((w, h), Image.BICUBIC)
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1))
        return (torch.stack(out) - self.mean) / self.std  # (B, 3, S, S)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], texts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(device)
        image_emb = self.model.get_image_features(pixel_values=self.pixels(images).to(device))
        text_emb = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        # transformers 5 returns a model output with the projected embedding as pooler_output; 4.x a tensor
        image_emb = getattr(image_emb, "pooler_output", image_emb)
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).cpu()  # (B,)


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@torch.no_grad()
def extract(
    paths: list[Path],
    texts: list[str] | None,
    inception: nn.Module | None,
    clip: ClipScorer | None,
    batch_size: int,
    device: torch.device,
    desc: str,
    resize: int = 0,
) -> dict[str, Tensor]:
    """Features of this rank's share of paths, gathered on rank 0 in the original order (other ranks get {})."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    ids = list(range(rank, len(paths), world_size))
    feats: dict[str, list[Tensor]] = {"pool": [], "logits": [], "clip": []}
    size = (resize, resize) if resize else load_rgb(paths[0]).size
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, disable=rank != 0):
        batch = ids[start : start + batch_size]
        images = [load_rgb(paths[i]) for i in batch]
        if resize:
            images = [im.resize((resize, resize), Image.BICUBIC) for im in images]
        for i, im in zip(batch, images):
            if im.size != size:
                fail(f"images of mixed sizes: {paths[i]} is {im.size}, {paths[0]} is {size} (see --ref-resize)")
        if inception is not None:
            x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
            pool, logits = inception(x.to(device))
            feats["pool"].append(pool.double().cpu())
            feats["logits"].append(logits.double().cpu())
        if clip is not None and texts is not None:
            feats["clip"].append(clip(images, [texts[i] for i in batch]).double())
    local = {k: torch.cat(v) for k, v in feats.items() if v}
    if world_size == 1:
        return local
    shards = [None] * world_size if rank == 0 else None
    dist.gather_object(local, shards, dst=0)
    if rank != 0:
        return {}
    # rank r holds rows r, r + W, r + 2W, ...: interleave them back into path order
    out = {}
    for k in local:
        full = torch.empty(len(paths), *local[k].shape[1:], dtype=local[k].dtype)
        for r, shard in enumerate(shards):
            if k in shard:  # a rank with no rows (fewer paths than ranks) sends {}
                full[r::world_size] = shard[k]
        out[k] = full
    return out


# -----------------------------------------------------------------------------
# metrics: torchmetrics does the math on features we extracted once (so every subset reuses them)


class Precomputed(nn.Module):
    """Identity "feature extractor": torchmetrics receives rows of already extracted features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def feature_stats(pool: Tensor) -> dict[str, np.ndarray]:
    """mu (D,) and sigma (D, D) in float64, the keys pytorch-fid uses in its .npz files, plus n."""
    return {"mu": pool.double().mean(0).numpy(), "sigma": torch.cov(pool.double().T).numpy(), "n": np.array(len(pool))}


def frechet_distance(ref: dict[str, np.ndarray], pool: Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    mu, sigma = torch.from_numpy(ref["mu"]).double(), torch.from_numpy(ref["sigma"]).double()
    n = int(ref.get("n", 2))  # any n > 1 rebuilds the same mu and sigma (pytorch-fid files do not store it)
    metric = FrechetInceptionDistance(feature=Precomputed(len(mu)), sync_on_compute=False)
    # the metric keeps running sums; load the reference as the sums that give exactly mu and sigma
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n)
    metric.update(pool.double(), real=False)
    return float(metric.compute())


def inception_score(logits: Tensor, splits: int) -> tuple[float, float]:
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features in buffer": that is the point;
        metric = InceptionScore(feature=Precomputed(logits.shape[1]), splits=splits, sync_on_compute=False)
        metric.update(logits.double())
        with torch.random.fork_rng():  # IS shuffles before splitting; fix the shuffle so reruns agree
            torch.manual_seed(0)
            mean, std = metric.compute()  # std is nan for one split
    return float(mean), float(std)


def load_reference(ref: str, inception: nn.Module | None, batch_size: int, device: torch.device, resize: int = 0):
    """A .npz of statistics, or a folder of real images whose statistics are computed here (rank 0 gets them)."""
    path = Path(ref)
    if path.is_file():
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                fail(f"{ref} has no mu / sigma arrays (save one with --save-ref-stats)")
            stats = {k: f[k] for k in f.files}
    elif path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            fail(f"no images in reference folder {ref}")
        pool = extract(paths, None, inception, None, batch_size, device, "reference", resize).get("pool")
        if pool is None:  # ranks other than 0
            return None
        stats = feature_stats(pool)
    else:
        fail(f"reference {ref} not found")
    dim = len(stats["mu"])
    if "n" in stats and int(stats["n"]) <= dim:
        fail(
            f"reference {ref} has {int(stats['n'])} images; a {dim}-dim covariance needs more than {dim} "
            f"(the protocol uses the 40,504 val2014 images)"
        )
    return stats


def score(
    feats: dict[str, Tensor], sets: dict[str, list[int]], metrics: list[str], ref: dict | None, is_splits: int
) -> dict[str, dict]:
    """Every metric on every set of image ids ("all" and the subsets), from features extracted once."""
    if "fid" in metrics and len(ref["mu"]) != feats["pool"].shape[1]:
        fail(f"the reference has {len(ref['mu'])}-dim statistics, the Inception gives {feats['pool'].shape[1]}")
    results = {}
    for name, ids in sets.items():
        m = {"n": len(ids)}
        if "fid" in metrics:
            if len(ids) <= feats["pool"].shape[1]:
                print(
                    f"warning: FID of '{name}' from {len(ids)} images <= feature dim {feats['pool'].shape[1]} "
                    f"is biased upwards; compare it only with sets of the same size"
                )
            m["fid"] = frechet_distance(ref, feats["pool"][ids])
        if "is" in metrics:
            m["is_mean"], m["is_std"] = inception_score(feats["logits"][ids], is_splits)
        if "clip" in metrics:
            m["clip_score"] = feats["clip"][ids].mean().item()  # raw cosine, the paper's scale
        results[name] = m
    return results


# -----------------------------------------------------------------------------
# reporting


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "diffusers", "transformers", "torchmetrics", "torch-fidelity", "numpy", "scipy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def table(rows: list[tuple[str, str, dict]]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"{'model':<28} {'set':<12} {'n':>7} {'FID':>8} {'IS':>16} {'CLIP':>7}"]
    for model, name, m in rows:
        is_ = "-" if m.get("is_mean") is None else f"{m['is_mean']:.2f} ± {m['is_std']:.2f}"
        lines.append(
            f"{model[-28:]:<28} {name[:12]:<12} {m['n']:>7} {fmt(m.get('fid'), '8.2f'):>8} "
            f"{is_:>16} {fmt(m.get('clip_score'), '7.4f'):>7}"
        )
    return "\n".join(lines)


def compare(files: list[str]):
    rows = []
    for file in files:
        if not Path(file).is_file():
            fail(f"{file} not found")
        report = json.loads(Path(file).read_text())
        rows += [(report["name"], name, m) for name, m in report["metrics"].items()]
    print(table(rows))
    print("CLIP score: raw cosine (the paper's scale; torchmetrics CLIPScore reports 100 x cosine)")


def write_json(path: Path, obj: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None, inception: nn.Module | None = None, clip: ClipScorer | None = None):
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare)
    metrics = [] if args.metrics == "none" else [m.strip() for m in args.metrics.split(",")]
    if unknown := set(metrics) - {"fid", "is", "clip"}:
        fail(f"unknown metric(s) {', '.join(sorted(unknown))} (choose from fid, is, clip, none)")
    if not args.prompts and not args.save_ref_stats:
        fail("nothing to do: give --prompts (generate and score), --save-ref-stats or --compare")
    if args.save_ref_stats and not (args.ref and Path(args.ref).is_dir()):
        fail("--save-ref-stats needs --ref pointing at a folder of real images")
    if args.prompts and not args.out_dir:
        fail("--prompts needs --out-dir")
    if args.subset and not args.prompts:
        fail("--subset needs --prompts")
    prompts = load_prompts(args.prompts, args.prompt_column)[: args.num_prompts] if args.prompts else []
    subsets = dict(load_subset(s, prompts) for s in args.subset)
    if "fid" in metrics and prompts and not args.ref:
        fail("FID needs --ref (a folder of real images or a .npz from --save-ref-stats), or leave fid out of --metrics")

    ddp, rank, local_rank, world_size, device = setup_ddp()
    try:
        # reference statistics first: a bad --ref should fail before hours of generation
        need_inception = bool(args.save_ref_stats) or (bool(prompts) and bool({"fid", "is"} & set(metrics)))
        if inception is None and need_inception:
            inception = load_inception(args.inception_weights).to(device)
        ref = None
        if args.ref and (args.save_ref_stats or "fid" in metrics):
            ref = load_reference(args.ref, inception, args.batch_size, device, args.ref_resize)
            if args.save_ref_stats and rank == 0:
                tmp = Path(args.save_ref_stats + ".tmp.npz")
                np.savez(tmp, **ref)
                os.replace(tmp, args.save_ref_stats)
                print0(f"saved reference statistics of {int(ref['n'])} images to {args.save_ref_stats}")
        if not prompts:
            return

        image_dir = Path(args.out_dir) / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        if args.model:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
                args.dtype, torch.float16 if device.type == "cuda" else torch.float32
            )
            generate(args, prompts, image_dir, device, dtype)
        if not metrics:
            return
        paths = [image_dir / f"{i:06d}.png" for i in range(len(prompts))]
        missing = sum(not p.is_file() for p in paths)
        if missing:
            fail(f"{missing} of {len(paths)} images missing in {image_dir}; pass --model to generate them")
        settings = check_record(image_dir.parent, prompts)["settings"]

        clip_name = "injected" if clip is not None else args.clip_model
        if "clip" in metrics and clip is None:
            clip = ClipScorer.load(args.clip_model, device)
        feats = extract(
            paths,
            prompts,
            inception if {"fid", "is"} & set(metrics) else None,
            clip if "clip" in metrics else None,
            args.batch_size,
            device,
            "features",
        )
        if rank != 0:
            return

        results = score(feats, {"all": list(range(len(prompts))), **subsets}, metrics, ref, args.is_splits)
        report = {
            "name": args.name or Path(args.unet or args.model or args.out_dir).name,
            "metrics": results,
            "protocol": {
                "generation": settings,
                "prompts": args.prompts,
                "image_size": list(load_rgb(paths[0]).size),
                "fid": {
                    "reference": args.ref,
                    "reference_n": int(ref["n"]) if ref is not None and "n" in ref else None,
                    "features": type(inception).__name__ if "pool" in feats else None,
                },
                "is": {"splits": args.is_splits, "features": "logits_unbiased" if "logits" in feats else None},
                "clip": {
                    "model": clip_name if "clip" in feats else None,
                    "scale": "raw cosine (torchmetrics CLIPScore = 100 x max(cosine, 0))",
                },
            },
            "versions": versions(),
        }
        write_json(Path(args.out_dir) / "metrics.json", report)
        print(table([(report["name"], name, m) for name, m in results.items()]))
        print(f"wrote {Path(args.out_dir) / 'metrics.json'} (CLIP score is the raw cosine, as in the paper)")
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
