"""The miniature's base models: initialisation that lets random parts learn, and the VLM pretraining."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.curate.marked_points import COLOURED_MARKS, LETTER_COLOURS
from perceptio.train.chat import ASSISTANT, USER, Turn
from perceptio.train.miniature import (
    GRID,
    MAP_BACKGROUND,
    VlmPretraining,
    MARK_LABELS,
    colour_map_question,
    held_out_report,
    mark_map_question,
    object_map,
    place_questions,
    pretrain_vlm,
    referring_questions,
    vlm_processor,
)
from perceptio.train.tiny import TinySize, sine_cosine_positions, tiny_internvl, tiny_sam2, tiny_text_tokenizer

# The ablation's 280-pixel tile (10x10 image tokens, the grid the maps are written on), narrower.
SMALL = TinySize(vision_width=16, vision_layers=1, image_size=280, text_width=32, text_layers=1, text_heads=2)


def test_sine_cosine_positions_name_every_patch_apart() -> None:
    codes = sine_cosine_positions(20, 32)
    assert codes.shape == (400, 32)
    assert codes.abs().max() <= 1.0
    # every patch has its own code, and patches of one row share the row half
    assert len({tuple(row) for row in codes.round(decimals=5).tolist()}) == 400
    grid = codes.view(20, 20, 32)
    assert torch.equal(grid[3, 0, :16], grid[3, 19, :16])
    assert torch.equal(grid[0, 7, 16:], grid[19, 7, 16:])


def test_tiny_vlm_starts_with_positions_and_sam2_with_fan_in_weights() -> None:
    vlm = tiny_internvl(tiny_text_tokenizer(), size=SMALL)
    positions = vlm.model.vision_tower.embeddings.position_embeddings[0, 1:]
    assert torch.equal(positions, sine_cosine_positions(SMALL.image_size // 14, SMALL.vision_width))
    sam = tiny_sam2(SMALL)
    layer = sam.mask_decoder.upscale_conv1
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)
    bound = 1 / math.sqrt(fan_in)
    # PyTorch's default: uniform within +-1/sqrt(fan_in) (std = bound / sqrt(3)), not N(0, 0.02)
    assert layer.weight.abs().max() <= bound + 1e-6
    assert layer.weight.std() > 0.5 * bound / math.sqrt(3) > 0.02


def test_colour_map_reads_the_instance_at_each_cell_centre() -> None:
    instances = np.zeros((20, 30), dtype=np.uint16)
    instances[0:4, 0:6] = 7  # covers cells (0..1, 0..1): centres at rows 1, 3 and columns 1.5, 4.5
    instances[18:20, 27:30] = 2  # cell (9, 9)
    record = {"objects": [{"instance": 7, "colour": "red"}, {"instance": 2, "colour": "blue"}]}
    question, answer = colour_map_question(record, instances, ["blue", "red"])
    assert len(answer) == GRID * GRID
    grid = [answer[row * GRID:(row + 1) * GRID] for row in range(GRID)]
    assert grid[0][:3] == "11." and grid[1][:3] == "11."
    assert grid[9][9] == "0"
    assert answer.count(MAP_BACKGROUND) == GRID * GRID - 5


def test_object_map_marks_covered_cells_and_always_the_best_one() -> None:
    instances = np.zeros((100, 100), dtype=np.uint16)
    instances[0:10, 0:10] = 1  # exactly cell (0, 0)
    instances[55:57, 55:57] = 2  # 4% of cell (5, 5): below a quarter, still marked as its best cell
    assert object_map(instances, 1) == "1" + MAP_BACKGROUND * 99
    tiny = object_map(instances, 2)
    assert tiny.count("1") == 1 and tiny[5 * GRID + 5] == "1"


def test_mark_map_puts_each_letter_on_the_cell_of_its_point_on_its_own_object() -> None:
    instances = np.zeros((200, 300), dtype=np.uint16)
    instances[20:60, 30:90], instances[120:180, 150:280], instances[100:110, 10:20] = 3, 5, 9
    record = {"objects": [{"instance": 3}, {"instance": 5}, {"instance": 9}, {"instance": 4}]}  # 4: hidden
    picture = Image.new("RGB", (300, 200), (90, 90, 90))
    for seed in range(20):
        marked, question, answer = mark_map_question(picture, record, instances, np.random.default_rng(seed))
        letters = [cell for cell in answer if cell != MAP_BACKGROUND]
        assert len(answer) == GRID * GRID and 2 <= len(letters) <= 3
        assert "".join(sorted(letters)) == MARK_LABELS[: len(letters)]  # A, B, ... each once
        for k, letter in enumerate(answer):
            if letter != MAP_BACKGROUND:  # the cell lies on one visible object (each point on another)
                rows = slice(k // GRID * 20, k // GRID * 20 + 20)
                columns = slice(k % GRID * 30, k % GRID * 30 + 30)
                assert set(np.unique(instances[rows, columns])) - {0}
        drawn = np.asarray(marked).astype(int) - np.asarray(picture).astype(int)
        assert np.abs(drawn).sum() > 0 and picture.getpixel((0, 0)) == (90, 90, 90)  # drawn on a copy
        coloured, _, same = mark_map_question(picture, record, instances, np.random.default_rng(seed), COLOURED_MARKS)
        assert same == answer, "the style changes the drawing, not the points"
        pixels = np.asarray(coloured)
        assert all((pixels == LETTER_COLOURS[k]).all(-1).any() for k in range(len(letters)))


def test_questions_of_a_world(synth_world: Path) -> None:
    records = json.loads((synth_world / "world.json").read_text())["images"]
    places = [pair for record in records for pair in place_questions(record)]
    assert places and all(len(answer.split()) == 2 or question.startswith("What is at") for question, answer in places)
    referring = referring_questions(synth_world, records)
    marks = [answer for questions in referring.values() for question, answer in questions if question.startswith("Mark ")]
    assert marks and all(len(answer) == GRID * GRID and "1" in answer for answer in marks)


def test_pretraining_lowers_the_loss_on_the_world(synth_world: Path) -> None:
    torch.manual_seed(0)
    tokenizer = tiny_text_tokenizer()
    vlm = tiny_internvl(tokenizer, size=SMALL)
    records = json.loads((synth_world / "world.json").read_text())["images"][:4]
    processor = vlm_processor(vlm, tokenizer)
    batch = processor.collate([
        processor.encode_conversation(Image.open(synth_world / record["file"]).convert("RGB"),
                                      [Turn(USER, question), Turn(ASSISTANT, answer)])
        for record in records for question, answer in place_questions(record)[:1]])

    def loss() -> float:
        with torch.no_grad():
            return float(vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], labels=batch["labels"]).loss)

    before = loss()
    logged: list[str] = []
    pretrain_vlm(vlm, tokenizer, synth_world, VlmPretraining(steps=40, batch_size=4, log_every=20, mark_share=0.3),
                 log=logged.append)
    assert len(logged) == 2 and "step 40/40" in logged[-1]
    assert loss() < before - 1.0
    assert not vlm.training


def test_pretraining_needs_enough_steps_for_its_schedule() -> None:
    with pytest.raises(ValueError, match="at least 40 steps"):
        VlmPretraining(steps=39)
    with pytest.raises(ValueError, match="sum to at most 1"):
        VlmPretraining(map_share=0.6, mark_share=0.5)


def test_held_out_report_scores_a_random_vlm_near_nothing(synth_world: Path) -> None:
    tokenizer = tiny_text_tokenizer()
    report = held_out_report(tiny_internvl(tokenizer, size=SMALL), tokenizer, synth_world, images=3)
    assert report["images"] == 3 and report["referring_maps"] >= 1
    assert report["mark_map_letters"] <= report["mark_map_cells_found"]
    for name in ("mark_map_letters", "mark_map_cells_found", "colour_map_cells", "colour_map_object_cells", "referring_map_iou", "place_exact"):
        assert 0.0 <= report[name] <= 1.0
    # a random model writes no map: it cannot beat the all-background answer
    assert report["colour_map_cells"] <= report["colour_map_all_background"]


def test_tiny_tokenizer_spells_every_word_of_the_world_as_one_token(synth_world: Path) -> None:
    """Referring expressions, pretraining questions and prompt templates: one token per word, with
    and without a leading space (a quoted expression starts without one). A referent spelt in byte
    pieces is what kept the miniature from carrying it to the [SEG] state."""
    import re

    from perceptio.curate.describe import AttributeCaptioner, ObjectAttributes
    from perceptio.curate.marked_points import QUESTION_TEXT
    from perceptio.sources.synth.conversations import image_questions
    from perceptio.train.data import PromptTemplates

    records = json.loads((synth_world / "world.json").read_text())["images"]
    texts = [text for asked in referring_questions(synth_world, records).values() for pair in asked for text in pair]
    rng = np.random.default_rng(0)
    for record in records:
        texts += [text for pair in place_questions(record) + image_questions(record["objects"], record["camera"]["width"], rng)
                  for text in pair]
    templates = PromptTemplates.load()
    texts += [*templates.grounding_prompts, *templates.question_prompts, *templates.direct_question_prompts,
              *templates.caption_prompts, QUESTION_TEXT]
    attributes = ObjectAttributes("cube", "orange", 0.03, "small", "right", "top", 0.4, 1, 3, "sphere")
    texts.append(AttributeCaptioner().describe(attributes, np.zeros((2, 2, 3)), np.zeros((2, 2), bool)))
    words = {word for text in texts for word in re.findall(r"[A-Za-z]+", re.sub(r"\{[a-z_]+\}", " ", text))}
    assert len(words) > 100  # the world's texts were read
    tokenizer = tiny_text_tokenizer()
    split = sorted(word for word in words
                   if len(tokenizer(word)["input_ids"]) != 1 or len(tokenizer(" " + word)["input_ids"]) != 1)
    assert split == []


@pytest.mark.slow
def test_a_pretrained_eye_on_a_fresh_or_deeper_language_model(synth_world: Path, tmp_path: Path) -> None:
    import sys
    from dataclasses import replace

    from transformers import InternVLForConditionalGeneration

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from miniature import LANGUAGE_PARTS, VISION_PARTS, build_miniature

    def same(a: Path, b: Path, parts: tuple[str, ...]) -> bool:
        first, second = (InternVLForConditionalGeneration.from_pretrained(folder) for folder in (a, b))
        return all(torch.equal(x, y) for part in parts
                   for x, y in zip(first.get_submodule(part).state_dict().values(),
                                   second.get_submodule(part).state_dict().values()))

    random, _ = build_miniature(tmp_path / "random", 0, size=SMALL)
    eye, _ = build_miniature(tmp_path / "eye", 0, synth_world, 40, SMALL, VlmPretraining(batch_size=2, mark_share=0.5),
                             fresh_language_model=True)
    # The pretraining moved the vision tower; the language model is back to its random weights.
    assert not same(eye, random, VISION_PARTS[:1]) and same(eye, random, LANGUAGE_PARTS)
    # A deeper language model starts from that eye: its vision parts are the eye's, its text layers new.
    deeper, _ = build_miniature(tmp_path / "deeper", 0, size=replace(SMALL, text_layers=2), vision_from=eye)
    assert same(deeper, eye, VISION_PARTS)
    layers = InternVLForConditionalGeneration.from_pretrained(deeper).model.language_model.layers
    assert len(layers) == 2 == SMALL.text_layers + 1
