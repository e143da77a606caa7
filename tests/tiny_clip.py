"""A tiny CLIP folder (model, tokenizer, image processor; random weights) for evaluate.py's CLIP score offline.

    python tests/tiny_clip.py runs/tiny_clip
The score it gives means nothing; it exercises the scoring path without the 5.5 GB ViT-g/14.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_sd import _tiny_tokenizer  # noqa: E402


def tiny_clip_model():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(tower, vocab_size=len(_tiny_tokenizer()), max_position_embeddings=16)
    config = CLIPConfig(
        text_config=dict(text, bos_token_id=0, eos_token_id=1, pad_token_id=2),
        vision_config=dict(tower, image_size=24, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def make_tiny_clip(out_dir: Path, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)):
    """Save a tiny CLIP folder through CLIPProcessor.save_pretrained (the file names the installed transformers
    writes), shorter side 24, center crop 24, the given normalisation (default: OpenAI's)."""
    from transformers import CLIPProcessor

    try:  # transformers 5: the PIL backend by name (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as image_processor
    except ImportError:
        from transformers import CLIPImageProcessor as image_processor

    out_dir = Path(out_dir)
    tiny_clip_model().save_pretrained(out_dir)
    processor = CLIPProcessor(
        image_processor=image_processor(
            size={"shortest_edge": 24},
            crop_size={"height": 24, "width": 24},
            image_mean=list(mean),
            image_std=list(std),
        ),
        tokenizer=_tiny_tokenizer(),
    )
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build a tiny random CLIP folder for evaluate.py's --clip-model.")
    parser.add_argument("folder", help="where to save the model, tokenizer and image processor")
    print(make_tiny_clip(Path(parser.parse_args().folder)))
