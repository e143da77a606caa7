"""A tiny Stable-Diffusion-v1-shaped pipeline for CPU tests.

Same block types and topology as SD v1.4 (3 cross-attention down stages + 1 plain down stage,
cross-attention mid block, 1 plain up stage + 3 cross-attention up stages, two layers per block),
only with tiny widths, so student derivation, layer mapping and hooks see the real structure.
The VAE keeps SD's 4 latent channels and downscale factor of 8 (four encoder stages).
"""

from pathlib import Path

import torch

# A small word list, enough for readable test captions; any other word falls back to characters.
_WORDS = (
    "a an the of on in with and photo picture painting drawing cat dog bird horse car tree house "
    "red blue green yellow black white small big sky sea mountain city street man woman child "
    "flower forest river boat night day sun moon snow rain field"
).split()


def _tiny_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    # CLIP's BPE marks word ends with "</w>". Single characters cover any caption; for the word list,
    # left-to-right merges (c+a -> ca, ca+t</w> -> cat</w>) make each word one token, as in real CLIP.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = []
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=max_length,
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="!",
    )


def make_tiny_sd(out_dir: Path, full_size: bool = False) -> Path:
    """Build, save (save_pretrained, safetensors) and return a tiny SD-v1-shaped pipeline folder.

    full_size=True gives SD v1.4's real shapes (860M UNet, CLIP ViT-L/14 text encoder, 77 tokens, the
    real VAE) with random weights and the same small tokenizer: for timing on a GPU without the hub."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(0)
    tokens = 77 if full_size else 16
    tokenizer = _tiny_tokenizer(tokens)
    width, layers, heads = (768, 12, 12) if full_size else (32, 2, 4)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408 if full_size else len(tokenizer),
            hidden_size=width,
            intermediate_size=4 * width if full_size else 64,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=tokens,
            projection_dim=width,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=64 if full_size else 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280) if full_size else (32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=32 if full_size else 8,
        cross_attention_dim=width,
        attention_head_dim=8 if full_size else 4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if full_size else (8, 8, 16, 16),
        layers_per_block=2 if full_size else 1,
        latent_channels=4,
        norm_num_groups=32 if full_size else 4,
        sample_size=512 if full_size else 64,
        scaling_factor=0.18215,
    )
    # SD v1.4's scheduler config.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Save a tiny SD-v1-shaped pipeline with random weights (for CPU tests).")
    p.add_argument("folder", type=Path, help="where to save it (diffusers save_pretrained)")
    print(make_tiny_sd(p.parse_args().folder))
