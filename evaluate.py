r"""
Generate images with a (compressed) Stable Diffusion or SDXL model and score them: FID, Inception Score, CLIP score.

MS-COCO 30K as BK-SDM and the Random Conditioning paper score it: 30K val2014 captions, 25 steps, guidance 7.5,
the pipeline's own scheduler (PNDM for SD v1) and size (512 px for SD v1, 1024 for SDXL). Each image is saved as
a JPEG (PIL's default quality, 75), that JPEG is resized to 256x256 (PIL's default filter, bicubic) and saved as
a JPEG again; FID, IS and CLIP score read the 256 px JPEGs. FID compares them with the 40,504 val2014 images put
through the same resize and JPEG. Once, the reference statistics:
    python evaluate.py --ref val2014/ --save-ref-stats coco_val2014_256.npz
Then each model (an SD or SDXL pipeline folder, e.g. train.py's output), on one GPU or on 8 (the same images):
    python evaluate.py --model runs/bk_base --prompts mscoco_val2014_30k/metadata.csv \
        --ref coco_val2014_256.npz --out-dir runs/eval/bk_base
    torchrun --standalone --nproc_per_node=8 evaluate.py --model runs/bk_base ...same arguments...
Side by side: python evaluate.py --compare runs/eval/sd14/metrics.json runs/eval/bk_base/metrics.json

Prompt i gets its own generator seeded with seed + i, so an image depends neither on the batch size nor
on the number of processes. Images already in OUT/images are kept (the run is resumable) and unreadable ones
are made again. Every process generates its share; then process 0 scores the files on disk.
"""

import argparse
import csv
import datetime
import functools
import inspect
import io
import json
import os
import re
from collections.abc import Callable
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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed
PIXEL_SETTINGS = ("model", "resolution", "steps", "guidance", "seed", "resize", "image_format")  # + scheduler, dtype
# NSFW filter off as in the paper (its black images would count in FID); watermark off (same pixels, installed or not)
FILTERS_OFF = dict(safety_checker=None, requires_safety_checker=False, add_watermarker=False)

# -----------------------------------------------------------------------------
# config and distributed setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        def _get_help_string(self, a):  # each default once: none for None, none where the help names one
            return a.help if a.default is None or "default" in a.help else super()._get_help_string(a)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    # what to generate
    p.add_argument("--model", help="SD or SDXL pipeline folder or hub id; omit to score the images in --out-dir")
    prompts = "csv with a text, caption or prompt column (prompt i: row i) or txt (prompt i: line i + 1); blank prompts"
    p.add_argument("--prompts", help=prompts + " are refused, not skipped (that would renumber the later ones)")
    p.add_argument("--num-prompts", type=int, help="use only the first N prompts (quick checks)")
    p.add_argument("--out-dir", help="images go to OUT/images, scores to OUT/metrics.json")
    p.add_argument("--name", help="label in tables (default: the --model name)")
    # how to generate and store the images (paper defaults)
    p.add_argument("--resolution", type=int, help="image side (default: the pipeline's own: 512 SD v1, 1024 SDXL)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of the pipeline's own scheduler")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=1234, help="prompt i uses seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="per process, generation and feature extraction")
    p.add_argument("--resize", type=int, default=256, help="size of scored and --ref images (0: as they are)")
    p.add_argument("--image-format", choices=["jpg", "png"], default="jpg", help="jpg as published; png lossless")
    # how to score
    p.add_argument("--metrics", default="fid,is,clip", help="comma list of fid, is, clip; 'none' only generates")
    p.add_argument("--ref", help="FID reference: a folder of real images or a .npz with mu, sigma")
    p.add_argument("--save-ref-stats", help="save the statistics of the --ref folder to this .npz (reuse it as --ref)")
    p.add_argument("--inception-weights", help="local torch-fidelity Inception file (default: download by name)")
    p.add_argument("--clip-model", default=DEFAULT_CLIP, help="transformers CLIP hub id or local folder")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score: mean and std over this many parts")
    # repeatable; IDS: a file of prompt ids or exact prompt texts, one per line; REF: .npz or folder (default --ref)
    p.add_argument("--subset", action="append", metavar="NAME=IDS[:REF]", help="prompts in file IDS too; FID vs REF")
    p.add_argument("--compare", nargs="+", metavar="METRICS_JSON", help="print metrics.json files side by side, exit")
    p.add_argument("--threads", type=int, default=0, help="torch's CPU threads; 0: torch's choice, 1 on a shared CPU")
    return p.parse_args(argv)


def fail(msg: str, e: Exception | None = None):
    """One line, exit 1; with e, its first line uncut (a URL stays whole), less advice about absent flags or traces."""
    why = [s for s in (str(e).strip().splitlines() or [""])[0].split(". ") if not re.search("files_only|stack", s)]
    raise SystemExit(f"error: {msg}" + (f" ({type(e).__name__}: {'. '.join(why)})" if e else ""))


def find_model(name: str, flag: str, file: str):
    """Before slow work, refuse what is neither a folder with `file` nor a hub id with `file` cached or on the hub."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    if Path(name).is_dir() and not (Path(name) / file).is_file():
        fail(f"{flag} {name}: the folder has no {file}")
    where = f"{flag} {name}: no such folder here, and as a hub id it is not in the local cache"
    try:  # a name that cannot be a hub id raises HFValidationError
        if Path(name).is_dir() or isinstance(try_to_load_from_cache(name, file), str):
            return
        if constants.HF_HUB_OFFLINE:
            fail(f"{where} while the hub is offline (HF_HUB_OFFLINE=1)")
        if not file_exists(name, file):
            fail(f"{where} nor on the hub ({constants.ENDPOINT})")
    except HFValidationError:
        fail(f"{flag} {name}: folder not found")
    except Exception as e:  # no connection, a proxy, a timeout, a gated model without a token
        fail(f"{where}, and the hub ({constants.ENDPOINT}) is unreachable or refused it", e)


def setup_ddp() -> tuple[bool, int, int, int, torch.device]:
    """Distributed setup: without torchrun the same code runs as one process."""
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:  # rank 0 may build reference statistics before it generates: generous timeout
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    return ddp, rank, local_rank, world_size or 1, device


# -----------------------------------------------------------------------------
# prompts and subsets


def load_prompts(path: str) -> list[str]:
    """Prompt i: the text, caption or prompt column of row i (csv), or line i + 1 (any other file). A blank prompt is
    refused with its line number: skipping it would renumber every later prompt and image."""
    file = Path(path)
    if not file.is_file():
        fail(f"prompt file {path} not found")
    try:
        text = (data := file.read_bytes()).decode("utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        fail(f"{path} line {line} is not UTF-8 (byte {data[e.start]:#04x}); save the file as UTF-8")
    if file.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        col = next((k for k in ("text", "caption", "prompt") if k in (reader.fieldnames or [])), None)
        if reader.fieldnames and col is None:
            fail(f"{path} has no column text, caption or prompt (it has {', '.join(reader.fieldnames)})")
        lines = [(reader.line_num, r[col] or "") for r in reader]  # (the record's last line, its prompt)
    else:  # newlines only: U+2028 and friends occur inside web captions, and str.splitlines() would split there
        lines = [(n, line.strip()) for n, line in enumerate(text.rstrip().split("\n"), 1) if text.strip()]
    if not lines:
        fail(f"no prompts in {path}")
    if blank := next((n for n, prompt in lines if not prompt.strip()), None):
        fail(f"{path} line {blank}: blank prompt (refused, not skipped: skipping would renumber every later prompt)")
    return [prompt for _, prompt in lines]


def load_subset(spec: str, prompts: list[str]) -> tuple[str, list[int], str | None]:
    """NAME=IDS[:REF] -> (NAME, prompt indices, REF). IDS lists prompt ids or prompt texts (each occurrence counts)."""
    name, _, rest = spec.partition("=")
    path, _, ref = rest.partition(":")
    if not name or not Path(path).is_file():
        fail(f"--subset {spec}: expected NAME=IDS[:REF] with an existing file IDS")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    if all(line.isdigit() for line in lines):
        ids = sorted({int(line) for line in lines})
        if bad := [i for i in ids if i >= len(prompts)]:
            fail(f"subset {name}: prompt id {bad[0]} out of range (there are {len(prompts)} prompts)")
    else:
        wanted = set(lines)
        if missing := sorted(wanted - set(prompts)):
            fail(f"subset {name}: {len(missing)} texts are not among the prompts, e.g. {missing[0]!r}")
        ids = [i for i, text in enumerate(prompts) if text in wanted]
    if not ids:
        fail(f"subset {name}: {path} is empty")
    return name, ids, ref or None


# the published image pipeline, for generated and real images alike


def jpeg(image: Image.Image) -> Image.Image:
    """The image as it reads back from a JPEG saved with PIL's defaults (quality 75, 4:2:0 chroma)."""
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    return Image.open(buf)


def read_image(path: Path, hint: str | None = None) -> Image.Image | None:
    """The image (RGB or L), decoded now so that a truncated file shows. Unreadable: None, or with a hint, an error."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode in ("RGB", "L") else im.convert("RGB")
    except (OSError, SyntaxError, ValueError):
        if hint:
            fail(f"cannot read {path} (truncated or not an image); {hint}")
        return None


def save_generated(image: Image.Image, path: Path, size: int, fmt: str):
    if fmt == "jpg":
        image = jpeg(image)  # the full-size JPEG that the published scripts save first and resize from
    if size:
        image = image.resize((size, size))  # PIL's default filter (bicubic), as the published scripts
    image.save(path)  # a file cut short by a crash is found unreadable and made again on the next run


def prepare_real(path: Path, size: int, fmt: str) -> Image.Image:
    """A reference image as BK-SDM prepares val2014: resized to size x size (no crop), saved as JPEG, read back."""
    im = read_image(path, "remove it from the reference folder")
    im = im.resize((size, size)) if size else im
    return (jpeg(im) if fmt == "jpg" else im).convert("RGB")


# -----------------------------------------------------------------------------
# generation


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


@torch.no_grad()
def generate(args, prompts: list[str], image_dir: Path, device: torch.device):
    import diffusers

    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:  # the pipeline class model_index.json names (SD, SDXL), with its own scheduler
        cls = getattr(diffusers, diffusers.DiffusionPipeline.load_config(args.model)["_class_name"])
        off = {k: v for k, v in FILTERS_OFF.items() if k in inspect.signature(cls.__init__).parameters}
        pipe = cls.from_pretrained(args.model, torch_dtype=dtype, **off).to(device)
    except Exception as e:  # a broken folder, a class this diffusers lacks
        fail(f"cannot load pipeline {args.model}", e)
    pipe.set_progress_bar_config(disable=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    # no autocast anywhere: SDXL's pipeline decodes in float32 itself when its VAE's config says force_upcast
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor  # SD v1 512, SDXL 1024
    settings = {k: getattr(args, k) for k in PIXEL_SETTINGS} | {"resolution": resolution}
    settings |= {"scheduler": type(pipe.scheduler).__name__, "dtype": str(pipe.unet.dtype).removeprefix("torch.")}
    record = check_record(image_dir.parent, prompts, settings)
    # every rank lists the missing images before anyone writes, so all ranks split the same list
    paths = [image_dir / f"{i:06d}.{args.image_format}" for i in range(len(prompts))]
    todo = [i for i, path in enumerate(paths) if read_image(path) is None]
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_json(image_dir.parent / "generation.json", record)
        unreadable = sum(paths[i].exists() for i in todo)
        print(f"generating {len(todo)} of {len(prompts)} images ({unreadable} unreadable) on {world_size} process(es)")
    mine = todo[rank::world_size]
    sampling = dict(height=resolution, width=resolution, num_inference_steps=args.steps)
    for start in tqdm(range(0, len(mine), args.batch_size), desc="generate", disable=rank != 0):
        ids = mine[start : start + args.batch_size]
        # CPU generators: the same initial latents on any device, and one per prompt so batching does not matter
        generators = [torch.Generator("cpu").manual_seed(args.seed + i) for i in ids]
        images = pipe([prompts[i] for i in ids], guidance_scale=args.guidance, generator=generators, **sampling).images
        for i, image in zip(ids, images):
            save_generated(image, paths[i], args.resize, args.image_format)
    if dist.is_initialized():
        dist.barrier()  # all images are on disk before rank 0 scores them


# -----------------------------------------------------------------------------
# feature extractors: Inception-v3 (FID, IS) and CLIP. Tests inject small ones with the same interface.


def load_inception(weights: str | None) -> nn.Module:
    """torch-fidelity's Inception-v3: the TensorFlow FID network (2015-12-05 weights) that torch-fidelity and
    pytorch-fid both use. Called on uint8 images (B, 3, H, W); returns (pool (B, 2048), logits_unbiased (B, 1008))."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except Exception as e:  # not installed, or its torchvision import fails
        how = "`pip install --no-deps torch-fidelity` and a torchvision of the same build as your torch (same release,"
        fail(f"FID/IS need torch-fidelity: {how} same CUDA or CPU), or pass --metrics clip", e)
    try:
        if weights is None:  # the file torch-fidelity would download, into torch's hub cache
            torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, weights_only=True)
            weights = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
        # torch-fidelity opens it with weights_only=False: a pickle that would run code is refused here first
        torch.load(weights, map_location="cpu", weights_only=True)
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], weights)
    except Exception as e:
        fail(f"cannot load Inception weights {weights or URL_INCEPTION_V3}", e)


class ClipScorer:
    """Cosine between CLIP image and text embeddings, per (image, prompt) pair. Preprocessing as OpenCLIP's (torchvision
    Resize and CenterCrop on PIL images): shorter side to `size` (bicubic), center crop `crop`, mean/std normalisation."""

    def __init__(self, model: nn.Module, tokenizer, size: int, crop: int, mean: list[float], std: list[float]):
        self.model, self.tokenizer, self.size, self.crop = model.eval(), tokenizer, size, crop
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def load(cls, name: str, device: torch.device) -> "ClipScorer":
        """Model, tokenizer and preprocessing settings through transformers' loaders (which read either config file)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(name).float().to(device)
            tokenizer = AutoTokenizer.from_pretrained(name)
            proc = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as e:
            fail(f"cannot load CLIP model {name}", e)
        size = proc.size.get("shortest_edge") or proc.size.get("height")
        return cls(model, tokenizer, size, proc.crop_size.get("height"), proc.image_mean, proc.image_std)

    def pixels(self, images: list[Image.Image]) -> Tensor:
        out = []
        for im in images:
            short, long = sorted(im.size)
            long = int(self.size * long / short)  # torchvision truncates
            w, h = (self.size, long) if im.width <= im.height else (long, self.size)
            im = im.convert("RGB").resize((w, h), Image.BICUBIC)
            left, top = round((w - self.crop) / 2), round((h - self.crop) / 2)
            im = im.crop((left, top, left + self.crop, top + self.crop))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1))
        return (torch.stack(out) - self.mean) / self.std  # (B, 3, crop, crop)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], texts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        n = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=n, return_tensors="pt").to(device)
        image_emb = self.model.get_image_features(pixel_values=self.pixels(images).to(device))
        text_emb = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        # transformers 5 returns a model output with the projected embedding as pooler_output; 4.x a tensor
        image_emb, text_emb = (getattr(e, "pooler_output", e) for e in (image_emb, text_emb))
        return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).cpu()  # (B,)


@torch.no_grad()
def extract(
    paths: list[Path], load: Callable[[Path], Image.Image], inception: nn.Module | None, clip=None, texts=None, batch=8
) -> dict[str, Tensor]:
    """Inception pool features and logits and/or CLIP cosines (with texts[i] for paths[i]), in path order."""
    feats: dict[str, list[Tensor]] = {"pool": [], "logits": [], "clip": []}
    size = None
    for start in tqdm(range(0, len(paths), batch), desc="features", disable=len(paths) <= batch):
        images = [load(p).convert("RGB") for p in paths[start : start + batch]]
        size = size or images[0].size
        if odd := next((p for p, im in zip(paths[start:], images) if im.size != size), None):
            fail(f"images of mixed sizes: {odd} is not {size[0]}x{size[1]} like {paths[0]} (see --resize)")
        if inception is not None:
            x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
            pool, logits = inception(x.to(next(inception.parameters()).device))
            feats["pool"].append(pool.double().cpu())
            feats["logits"].append(logits.double().cpu())
        if clip is not None:
            feats["clip"].append(clip(images, texts[start : start + batch]).double())
    return {k: torch.cat(v) for k, v in feats.items() if v}


# -----------------------------------------------------------------------------
# metrics, in float64 on features extracted once (so every subset reuses them)


def feature_stats(pool: Tensor) -> dict[str, np.ndarray]:
    """mu (D,) and sigma (D, D) in float64, the keys pytorch-fid uses in its .npz files, plus n."""
    return {"mu": pool.double().mean(0).numpy(), "sigma": torch.cov(pool.double().T).numpy(), "n": np.array(len(pool))}


def frechet_distance(ref: dict[str, np.ndarray], pool: Tensor) -> float:
    """|mu_r - mu|^2 + tr(S_r) + tr(S) - 2 tr((S_r S)^1/2) between the reference and the features' Gaussian.
    tr((S_r S)^1/2) = tr((A S A)^1/2) with A = S_r^1/2: the same eigenvalues, of a symmetric matrix (eigh)."""
    mu_r, s_r = np.asarray(ref["mu"], np.float64), np.asarray(ref["sigma"], np.float64)
    mine = feature_stats(pool)
    w, v = np.linalg.eigh(s_r)
    a = (v * np.sqrt(w.clip(min=0))) @ v.T  # (D, D)
    tr_covmean = np.sqrt(np.linalg.eigvalsh(a @ mine["sigma"] @ a).clip(min=0)).sum()
    return float(((mu_r - mine["mu"]) ** 2).sum() + np.trace(s_r) + np.trace(mine["sigma"]) - 2 * tr_covmean)


def inception_score(logits: Tensor, splits: int) -> tuple[float, float]:
    """torch-fidelity's IS: rows shuffled with numpy RandomState(2020), cut at i * N // splits, exp(E_x KL(p(y|x)
    || p(y))) per part, then the mean and the population std (ddof 0) over the parts."""
    n = len(logits)
    logits = logits.double()[torch.from_numpy(np.random.RandomState(IS_SHUFFLE_SEED).permutation(n))]
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    parts = [slice(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    scores = [(p[s] * (log_p[s] - p[s].mean(0).log())).sum(1).mean().exp().item() for s in parts]
    return float(np.mean(scores)), float(np.std(scores))


def load_reference(ref: str, inception: nn.Module | None, args) -> dict[str, np.ndarray]:
    """A .npz of statistics, or a folder of real images put through the --resize / --image-format pipeline."""
    path = Path(ref)
    if path.is_file():
        try:
            with np.load(path) as f:
                stats = {k: f[k] for k in f.files}
        except Exception as e:
            fail(f"cannot read {ref} as a .npz of statistics ({type(e).__name__})")
        if "mu" not in stats or "sigma" not in stats:
            fail(f"{ref} has no mu / sigma arrays (save one with --save-ref-stats)")
    elif path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            fail(f"no images in reference folder {ref}")
        load = functools.partial(prepare_real, size=args.resize, fmt=args.image_format)
        stats = feature_stats(extract(paths, load, inception, batch=args.batch_size)["pool"])
    else:
        fail(f"reference {ref} not found")
    if "n" in stats and int(stats["n"]) <= len(stats["mu"]):  # rank-deficient covariance
        print(f"warning: reference {ref} from {int(stats['n'])} <= {len(stats['mu'])} images; its FIDs are biased")
    return stats


def score(feats: dict[str, Tensor], sets: dict, metrics: list[str], refs: dict, splits: int) -> dict[str, dict]:
    """Every metric on every set of image ids ("all" and the subsets), each FID against its set's reference."""
    results = {}
    for name, (ids, ref) in sets.items():
        m = {"n": len(ids)}
        if "fid" in metrics:
            pool = feats["pool"][ids]
            if len(refs[ref]["mu"]) != pool.shape[1]:
                fail(f"{ref} holds {len(refs[ref]['mu'])}-dim statistics, the Inception gives {pool.shape[1]}")
            if len(ids) <= pool.shape[1]:  # rank-deficient covariance
                print(f"warning: FID of {name} from {len(ids)} <= {pool.shape[1]} images is biased upwards")
            m["fid"], m["fid_reference"] = frechet_distance(refs[ref], pool), ref
        if "is" in metrics:
            m["is_mean"], m["is_std"] = inception_score(feats["logits"][ids], splits)
        if "clip" in metrics:
            m["clip_score"] = feats["clip"][ids].mean().item()  # raw cosine, the paper's scale
        results[name] = m
    return results


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = [f"{'model':<28} {'set':<12} {'n':>7} {'FID':>8} {'IS':>16} {'CLIP':>7}"]
    for model, name, m in rows:
        fid = "-" if m.get("fid") is None else f"{m['fid']:.2f}"
        is_ = "-" if m.get("is_mean") is None else f"{m['is_mean']:.2f} ± {m['is_std']:.2f}"
        clip = "-" if m.get("clip_score") is None else f"{m['clip_score']:.4f}"
        lines.append(f"{model[-28:]:<28} {name[:12]:<12} {m['n']:>7} {fid:>8} {is_:>16} {clip:>7}")
    return "\n".join(lines)


def compare(files: list[str]):
    rows = []
    for file in files:
        try:
            report = json.loads(Path(file).read_text())
            rows += [(str(report["name"]), name, m) for name, m in report["metrics"].items()]
            text = table(rows)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            fail(f"cannot read {file} as a metrics.json written by evaluate.py ({type(e).__name__}: {e})")
    print(text)


def write_json(path: Path, obj: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# main


def check_args(args) -> tuple[list[str], list[str], dict[str, tuple[list[int], str | None]]]:
    """Everything that can be refused before any model loads: (metrics, prompts, sets of image ids with their refs)."""
    metrics = [] if args.metrics == "none" else [m.strip() for m in args.metrics.split(",")]
    if unknown := set(metrics) - {"fid", "is", "clip"}:
        fail(f"unknown metric(s) {', '.join(sorted(unknown))} (choose from fid, is, clip, none)")
    if not args.prompts and not args.save_ref_stats:
        fail("nothing to do: give --prompts (generate and score), --save-ref-stats or --compare")
    if args.save_ref_stats and not (args.ref and Path(args.ref).is_dir()):
        fail("--save-ref-stats needs --ref pointing at a folder of real images")
    if args.prompts and not args.out_dir:
        fail("--prompts needs --out-dir")
    if args.num_prompts is not None and args.num_prompts < 1:
        fail(f"--num-prompts {args.num_prompts}: give at least 1 (or leave it out for all prompts)")
    if args.threads < 0:
        fail(f"--threads {args.threads}: give 0 (torch's choice) or more")
    if args.prompts:  # an --out-dir that cannot be made or written is refused before any model loads (and not made)
        near = next(p for p in [Path(args.out_dir), *Path(args.out_dir).parents] if p.exists())
        if not near.is_dir() or not os.access(near, os.W_OK | os.X_OK):
            fail(f"--out-dir {args.out_dir} cannot be written: {near} is {'read-only' if near.is_dir() else 'a file'}")
    if args.model:
        find_model(args.model, "--model", "model_index.json")
    prompts = load_prompts(args.prompts)[: args.num_prompts] if args.prompts else []
    sets = {"all": (list(range(len(prompts))), args.ref)}
    for spec in args.subset or []:
        name, ids, ref = load_subset(spec, prompts)
        if name in sets:
            fail(f"--subset {spec}: the name {name} is taken")
        sets[name] = (ids, ref or args.ref)
    if "fid" in metrics and prompts and not args.ref:
        fail("FID needs --ref (a folder of real images or a .npz from --save-ref-stats), or leave fid out of --metrics")
    small = min(sets, key=lambda s: len(sets[s][0]))
    if "is" in metrics and prompts and len(sets[small][0]) < args.is_splits:
        fail(f"IS in {args.is_splits} splits needs as many images; set {small} has {len(sets[small][0])}")
    return metrics, prompts, sets


def score_images(args, prompts, sets, metrics, refs, inception, clip, device):
    """Rank 0: every metric from the image files on disk, written to OUT/metrics.json and printed."""
    image_dir = Path(args.out_dir) / "images"
    paths = [image_dir / f"{i:06d}.{args.image_format}" for i in range(len(prompts))]
    if missing := sum(not p.is_file() for p in paths):
        fail(f"{missing} of {len(paths)} images ({paths[0].name}, ...) missing in {image_dir}; pass --model")
    settings = check_record(image_dir.parent, prompts)["settings"]
    if "clip" in metrics and clip is None:
        clip = ClipScorer.load(args.clip_model, device)
    hint = "delete it and run again with --model to make it again"
    feats = extract(paths, lambda p: read_image(p, hint), inception, clip, prompts, args.batch_size)
    results = score(feats, sets, metrics, refs, args.is_splits)
    fid = {"reference": args.ref, "features": f"pool {feats['pool'].shape[1]}" if "pool" in feats else None}
    protocol = dict(generation=settings, prompts=args.prompts, image_format=args.image_format, fid=fid)
    protocol["is"] = {"splits": args.is_splits, "shuffle_seed": IS_SHUFFLE_SEED, "std": "population (ddof 0)"}
    protocol["clip"] = {"model": args.clip_model if "clip" in metrics else None, "scale": "raw cosine"}
    report = {"name": args.name or Path(args.model or args.out_dir).name, "metrics": results, "protocol": protocol}
    write_json(Path(args.out_dir) / "metrics.json", report)
    print(table([(report["name"], name, m) for name, m in results.items()]))
    if shared := [name for name, (_, ref) in sets.items() if "fid" in metrics and name != "all" and ref == args.ref]:
        print(f"FID of {', '.join(shared)} against --ref {args.ref}, the reference of all prompts (see NAME=IDS:REF)")
    print(f"wrote {Path(args.out_dir) / 'metrics.json'} (CLIP score is the raw cosine, as in the paper)")


def main(argv: list[str] | None = None, inception: nn.Module | None = None, clip: ClipScorer | None = None):
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare)
    metrics, prompts, sets = check_args(args)
    if prompts and "clip" in metrics and clip is None:  # before generating: a missing CLIP should not wait for images
        find_model(args.clip_model, "--clip-model", "config.json")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    ddp, rank, _, _, device = setup_ddp()
    try:
        refs = {}
        if rank == 0:  # reference statistics first: a bad --ref should fail before hours of generation
            if inception is None and (args.save_ref_stats or (prompts and {"fid", "is"} & set(metrics))):
                inception = load_inception(args.inception_weights).to(device)
            if args.save_ref_stats or "fid" in metrics:
                refs = {ref: load_reference(ref, inception, args) for ref in {r for _, r in sets.values()} if ref}
            if args.save_ref_stats:
                np.savez(args.save_ref_stats, **refs[args.ref])
                print(f"saved reference statistics of {int(refs[args.ref]['n'])} images to {args.save_ref_stats}")
        if prompts and args.model:
            generate(args, prompts, Path(args.out_dir) / "images", device)
        if prompts and metrics and rank == 0:
            score_images(args, prompts, sets, metrics, refs, inception, clip, device)
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
