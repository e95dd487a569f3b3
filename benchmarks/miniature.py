"""Build the miniature Perceptio base models: a tiny InternVL and a tiny SAM2 as ordinary model folders.

The real recipe fine-tunes pretrained parts; the miniature starts from random ones, optionally
pretrains its VLM on the training world (``--world W --vlm-steps N``, see
:mod:`perceptio.train.miniature`) and, unlike the built-in ``--model tiny``, trains every part in
the Perceptio fine-tuning (vision tower, language model, SAM2 encoder and decoder): measured in
README "Perceptio in miniature", frozen random encoders let no mask be learned even on training
images. The folders are written by ``save_pretrained``, so the trainer loads them exactly as real
checkpoints::

    python benchmarks/miniature.py --out mini --seed 0 --world W --vlm-steps 2000
    perceptio-train --model mini/vlm --sam-model mini/sam2 --train-language-model --train-vision \\
        --train-sam-encoder --lr 1e-3 --head-lr 1e-3 --batch-size 8 ...

The default size is the one the ablation (benchmarks/ablation.py) uses: a 280-pixel tile, so the
image is 10x10 tokens, the same grid as the 100 depth tokens.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

from perceptio.curate.marked_points import HARDBLINK_MARKS, MARK_STYLES
from perceptio.train.miniature import VlmPretraining
from perceptio.train.tiny import VLM_FOLDER, TinySize, save_miniature

# The ablation's miniature (README "Perceptio in miniature" says how it was chosen).
MINIATURE = TinySize(vision_width=32, vision_layers=2, image_size=280, text_width=64, text_layers=2, text_heads=4,
                     sam_stage_widths=(8, 16, 32, 64), sam_width=32)


# The parts of the tiny InternVL that see, and the parts that read and write text.
VISION_PARTS = ("model.vision_tower", "model.multi_modal_projector")
LANGUAGE_PARTS = ("model.language_model", "lm_head")


def _take(target, source, parts: tuple[str, ...]) -> None:
    """Copy the weights of ``parts`` (submodule names) from ``source`` into ``target``."""
    for name in parts:
        target.get_submodule(name).load_state_dict(source.get_submodule(name).state_dict())


def build_miniature(out: Path, seed: int, world: Path | None = None, vlm_steps: int = 0,
                    size: TinySize = MINIATURE, pretraining: VlmPretraining | None = None,
                    fresh_language_model: bool = False, report_world: Path | None = None,
                    vision_from: Path | None = None) -> tuple[Path, Path]:
    """``out/vlm`` and ``out/sam2``; with ``world`` and ``vlm_steps``, the VLM pretrained on that
    world (``pretraining``: its settings other than steps and seed; ``report_world``: print what the
    pretrained VLM reads there); ``fresh_language_model``: then only the vision tower and its
    projector keep what they learned, the language model is put back to its random weights (a
    pretrained eye for a language model still free to learn new lookups). ``vision_from``: another
    miniature VLM folder whose vision tower and projector this one starts from (the language model
    may differ in depth; the widths must match)."""
    vlm, sam = save_miniature(out, size, seed=seed)
    pretrain = world is not None and vlm_steps > 0
    if not pretrain and vision_from is None:
        return vlm, sam
    import torch
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from perceptio.io import atomic_directory
    from perceptio.train.miniature import held_out_report, pretrain_vlm

    tokenizer = AutoTokenizer.from_pretrained(vlm)
    model = InternVLForConditionalGeneration.from_pretrained(vlm)
    if vision_from is not None:
        _take(model, InternVLForConditionalGeneration.from_pretrained(vision_from), VISION_PARTS)
    if pretrain:
        torch.manual_seed(seed)
        settings = replace(pretraining or VlmPretraining(), steps=vlm_steps, seed=seed)
        pretrain_vlm(model, tokenizer, world, settings)
        if report_world is not None:
            reads = held_out_report(model, tokenizer, report_world, mark_style=settings.mark_style)
            print(json.dumps({"pretrained_vlm_reads": reads}))
        if fresh_language_model:
            _take(model, InternVLForConditionalGeneration.from_pretrained(vlm), LANGUAGE_PARTS)
    with atomic_directory(out / VLM_FOLDER) as staging:  # replaces the random one
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return vlm, sam


def report(vlm: Path, world: Path, images: int = 40, mark_style: str = HARDBLINK_MARKS) -> dict[str, float]:
    """:func:`perceptio.train.miniature.held_out_report` of the VLM folder on ``world``."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from perceptio.train.miniature import held_out_report

    return held_out_report(InternVLForConditionalGeneration.from_pretrained(vlm), AutoTokenizer.from_pretrained(vlm), world, images,
                           mark_style)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write vlm/ and sam2/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same folders)")
    parser.add_argument("--world", type=Path, help="a synthetic world (perceptio-curate synth) to pretrain the VLM on")
    parser.add_argument("--vlm-steps", type=int, default=0, help="VLM pretraining steps on --world (0: random VLM)")
    parser.add_argument("--report-world", type=Path, help="another world: print what the VLM reads from its pictures")
    parser.add_argument("--map-share", type=float, default=VlmPretraining.map_share,
                        help="share of pretraining examples that are colour maps")
    parser.add_argument("--mark-share", type=float, default=VlmPretraining.mark_share,
                        help="share of pretraining examples that are mark maps (where the letters of marked points are)")
    parser.add_argument("--mark-style", choices=MARK_STYLES, default=VlmPretraining.mark_style,
                        help="how the mark maps' points are marked (as the fine-tuning questions will be)")
    parser.add_argument("--fresh-language-model", action="store_true",
                        help="after pretraining, keep the vision tower and projector, put the language model back to random")
    parser.add_argument("--vision-from", type=Path,
                        help="a miniature VLM folder whose vision tower and projector the new VLM starts from")
    for option in fields(TinySize):
        if option.name != "sam_stage_widths":
            parser.add_argument(f"--{option.name.replace('_', '-')}", type=int, default=getattr(MINIATURE, option.name))
    arguments = parser.parse_args()
    size = TinySize(**{option.name: getattr(arguments, option.name, getattr(MINIATURE, option.name)) for option in fields(TinySize)})
    pretraining = VlmPretraining(map_share=arguments.map_share, mark_share=arguments.mark_share,
                                 mark_style=arguments.mark_style)
    vlm, sam = build_miniature(arguments.out, arguments.seed, arguments.world, arguments.vlm_steps, size, pretraining,
                               arguments.fresh_language_model, arguments.report_world, arguments.vision_from)
    print(f"miniature {size}: {vlm} {sam}")


if __name__ == "__main__":
    main()
