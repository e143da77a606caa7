"""
Per-GPU memory of a distillation step: KOALA's recipe (SDXL base 1.0 teacher, koala_1b or koala_700m, batch
8 per GPU at 1024 px, fp16 autocast, AdamW, no EMA) and BK-SDM's (SD v1.4, bk_base, batch 64 at 512 px, EMA).

    python bench/memory.py [--json]    # a table in GiB, without and with gradient checkpointing; JSON bytes last

Teacher, student and losses run once on meta tensors (no memory, no arithmetic) with CUDA autocast's casts
(emulated: autocast skips meta) and attention kept as a fused SDPA kernel keeps it (q, k, v, output, logsumexp;
no N x N matrix); each tensor saved for backward counts once. The sum is a little above the peak: gradients
fill in as activations are freed.
"""

import argparse
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_train import SD14_UNET  # noqa: E402
from tiny_sdxl import SDXL_UNET  # noqa: E402

import train  # noqa: E402
from randcond import FeatureDistiller, output_kd_loss  # noqa: E402

# student: (teacher UNet config, batch per GPU, latent side, EMA), as each recipe publishes it
RECIPES = {"koala_1b": (SDXL_UNET, 8, 128, 0), "koala_700m": (SDXL_UNET, 8, 128, 0), "bk_base": (SD14_UNET, 64, 64, 1)}
CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)  # ViT-L/14
CLIP_G = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120)  # bigG
HALF = {F.linear, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm}  # CUDA autocast runs these in fp16,
FLOAT = {F.group_norm, F.layer_norm, F.softmax, F.mse_loss}  # these in fp32, the rest in their inputs' dtype
NOTE = "an estimate from parameter counts and a meta-device trace, not measured on a GPU"


def key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # a view shares its base's storage, so counts with it


def nbytes(*kept: dict) -> int:
    return sum(t.untyped_storage().nbytes() for t in {k: t for d in kept for k, t in d.items()}.values())


class FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):  # (B, heads, N, d), (B, heads, M, d), (B, heads, M, e) -> (B, heads, N, e)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))  # logsumexp
        return out


class Trace(torch.overrides.TorchFunctionMode):
    """Autocast's casts, and each tensor autograd saves, by storage (each held, so keys stay unique): all of them,
    those saved outside checkpointed blocks, the blocks' inputs, and each block's own bytes. Parameters are not
    activations; their fp16 casts, cached by autocast through the forward, go to copies."""

    def __init__(self, params: set):
        super().__init__()
        self.params, self.copies, self.block, self.own = params, {}, None, []
        self.all, self.outside, self.inputs = {}, {}, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        dtype = torch.float16 if func in HALF else torch.float32 if func in FLOAT else None
        return func(*[self.cast(a, dtype) for a in args] if dtype else args, **(kwargs or {}))  # tensors: positional

    def cast(self, x, dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        y = x.to(dtype)
        if x.is_leaf and x.requires_grad:
            self.copies[key(y)] = y
        return y

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if key(t) not in self.params and key(t) not in self.copies:
            self.all.setdefault(key(t), t)
            (self.outside if self.block is None else self.block).setdefault(key(t), t)
        return t

    def checkpoint(self, block, *args):
        """diffusers' gradient checkpointing function, as non-reentrant torch.utils.checkpoint keeps memory: the
        block's inputs, not what it saves inside (recomputed, one block at a time, in the backward)."""
        inputs = {key(t): t for t in args if isinstance(t, torch.Tensor)}
        self.inputs |= inputs
        self.block = {}
        out = block(*args)
        self.own.append(nbytes({k: t for k, t in self.block.items() if k not in inputs and k not in self.outside}))
        self.block = None
        return out


def estimate(name: str) -> list[dict]:
    """One student's recipe, without and with gradient checkpointing: parameter counts and bytes by item."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    teacher_cfg, batch, side, ema = RECIPES[name]
    sdxl, text = "addition_embed_type" in teacher_cfg, dict(vocab_size=49408, max_position_embeddings=77)
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(teacher_cfg).half().requires_grad_(False).eval()
        student, layers = train.build_student(teacher, name, "random")
        models = dict(student=student, teacher=teacher, clip_l=CLIPTextModel(CLIPTextConfig(**CLIP_L, **text)))
        if sdxl:  # and OpenCLIP bigG with a text projection
            models["clip_g"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **text, projection_dim=1280))
        models["vae"] = AutoencoderKL(**vae, up_block_types=["UpDecoderBlock2D"] * 4)  # SD's VAE, and SDXL's
        inputs, h = (torch.empty(batch, 4, side, side), torch.zeros(batch, dtype=torch.long)), dict(dtype=torch.float16)
        cond = dict(encoder_hidden_states=torch.empty(batch, 77, teacher.config.cross_attention_dim, **h))  # (B, 77, D)
        if sdxl:  # pooled bigG text (B, 1280), size and crop ids (B, 6)
            pooled, ids = torch.empty(batch, 1280, **h), torch.empty(batch, 6, **h)
            cond["added_cond_kwargs"] = dict(text_embeds=pooled, time_ids=ids)
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    trace = Trace({key(p) for m in (teacher, student) for p in m.parameters()})
    student.train().enable_gradient_checkpointing(trace.checkpoint)  # diffusers 0.42: whenever grad is on
    sdpa = mock.patch.object(F, "scaled_dot_product_attention", lambda q, k, v, **_: FusedAttention.apply(q, k, v))
    with FeatureDistiller(teacher, student, layers) as distiller, sdpa, trace:
        with torch.autograd.graph.saved_tensors_hooks(trace.pack, lambda t: t):
            with torch.no_grad():
                teacher_pred = teacher(*inputs, **cond).sample
            model_pred = student(*inputs, **cond).sample
            plain, gc = nbytes(trace.all), nbytes(trace.outside, trace.inputs)  # kept by the student's forward
            features = {key(f): f for f in sum(distiller.features(), [])}  # held until the loss, which saves more
            distiller.loss() + output_kd_loss(model_pred, teacher_pred)
    kd = {False: nbytes(trace.all, features) - plain, True: nbytes(trace.outside, trace.inputs, features) - gc}
    s, fixed = n["student"], {"student weights, fp32": 4 * n["student"]}
    fixed |= {"gradients, fp32": 4 * s, "AdamW moments, fp32": 8 * s, "EMA of the student, fp32": 4 * s * ema}
    fixed |= {"teacher UNet, fp16": 2 * n["teacher"], "text encoders, fp16": 2 * (n["clip_l"] + n.get("clip_g", 0))}
    fixed |= {"VAE, fp32": 4 * n["vae"], "student weights cast to fp16": nbytes(trace.copies)}
    recipe, rows = f"{'SDXL' if sdxl else 'SD v1.4'} {8 * side} px x {batch}", []
    for ckpt, act in ((False, plain), (True, gc + max(trace.own))):  # + one block's own, recomputed in the backward
        b = fixed | {"activations kept for backward": act, "feature KD: features + fp32 differences": kd[ckpt]}
        rows.append(dict(student=name, recipe=recipe, checkpointing=ckpt, params=n, bytes=b, total=sum(b.values())))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="also print one JSON line of bytes, last")
    args = p.parse_args()
    runs = [row for name in RECIPES for row in estimate(name)]

    def line(label: str, cells: list, width: int = 11) -> None:
        print(f"{label:<34}" + "".join(f"{c:>{width}}" for c in cells))

    print(f"GiB per GPU, {NOTE}")
    line("", [r["student"] for r in runs[::2]], 22)
    line("", [r["recipe"] for r in runs[::2]], 22)
    line("gradient checkpointing", ["yes" if r["checkpointing"] else "no" for r in runs])
    for item in [*runs[0]["bytes"], "total"]:
        line(item, [f"{r['bytes'].get(item, r['total']) / 2**30:.2f}" for r in runs])
    print("On top: allocator fragmentation, cuDNN / cuBLAS workspaces, the CUDA context (~0.5-1 GB). DDP's gradient")
    print("buckets hold the gradients themselves (train.py sets gradient_as_bucket_view). Parameters:")
    for r in runs[::2]:
        print(f"  {r['student']}: " + ", ".join(f"{k} {v:,}" for k, v in r["params"].items()))
    if args.json:
        print(json.dumps(dict(estimate=NOTE, runs=runs)))


if __name__ == "__main__":
    main()
