"""Build the miniature Perceptio base models: a tiny InternVL and a tiny SAM2 as ordinary model folders.

The real recipe fine-tunes pretrained parts; the miniature starts from random ones and, unlike the
built-in ``--model tiny``, trains every part (vision tower, language model, SAM2 encoder and
decoder): measured in README "Perceptio in miniature", frozen random encoders let no mask be
learned even on training images. The folders are written by ``save_pretrained``, so the trainer
loads them exactly as real checkpoints::

    python benchmarks/miniature.py --out mini --seed 0
    perceptio-train --model mini/vlm --sam-model mini/sam2 --train-language-model --train-vision \\
        --train-sam-encoder --lr 1e-2 --head-lr 1e-3 --batch-size 8 ...

The default size is the one the ablation (benchmarks/ablation.py) uses: a 280-pixel tile, so the
image is 10x10 tokens, the same grid as the 100 depth tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from perceptio.train.tiny import TinySize, save_miniature

# The ablation's miniature (README "Perceptio in miniature" says how it was chosen).
MINIATURE = TinySize(vision_width=32, vision_layers=2, image_size=280, text_width=64, text_layers=2, text_heads=4,
                     sam_stage_widths=(8, 16, 32, 64), sam_width=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write vlm/ and sam2/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same folders)")
    for option in fields(TinySize):
        if option.name != "sam_stage_widths":
            parser.add_argument(f"--{option.name.replace('_', '-')}", type=int, default=getattr(MINIATURE, option.name))
    arguments = parser.parse_args()
    size = TinySize(**{option.name: getattr(arguments, option.name, getattr(MINIATURE, option.name)) for option in fields(TinySize)})
    vlm, sam = save_miniature(arguments.out, size, seed=arguments.seed)
    print(f"miniature {size}: {vlm} {sam}")


if __name__ == "__main__":
    main()
