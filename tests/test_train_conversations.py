"""Conversations in training, token by token: a multi-turn LLaVA example and a two-mask grounded caption."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.shards import ShardSample, mask_to_rle
from perceptio.tokens import SEG
from perceptio.train import losses
from perceptio.train.chat import ASSISTANT, USER, Turn
from perceptio.train.config import PerceptioConfig
from perceptio.train.data import PromptTemplates, expand_sample, grounded_target
from perceptio.train.model import PerceptioModel

IGNORE = losses.IGNORE_INDEX
TURNS = [Turn(USER, "What colour is the cube?"), Turn(ASSISTANT, "red"),
         Turn(USER, "How many spheres are there?"), Turn(ASSISTANT, "2"),
         Turn(USER, "Is the cube left of the cone?"), Turn(ASSISTANT, "yes, it is")]


@pytest.fixture(scope="module")
def model(vqvae_dir) -> PerceptioModel:
    torch.manual_seed(0)
    return PerceptioModel.from_config(PerceptioConfig(model="tiny", tokenizer=str(vqvae_dir), lora_rank=4))


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of labelled positions."""
    found, start = [], None
    for position, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = position
        elif label == IGNORE and start is not None:
            found.append((start, position))
            start = None
    return found


def test_multi_turn_labels_cover_every_answer_and_nothing_else(model: PerceptioModel) -> None:
    processor, tokenizer = model.processor, model.tokenizer
    encoded = processor.encode_conversation(picture(), TURNS)
    ids, labels = encoded["input_ids"].tolist(), encoded["labels"].tolist()
    # The input is the chat template's own rendering of the whole conversation, image expanded.
    messages = [{"role": t.role, "content": [{"type": "image"}] * (i == 0) + [{"type": "text", "text": t.text}]}
                for i, t in enumerate(TURNS)]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False).removesuffix("\n")
    tiles = encoded["pixel_values"].shape[0]
    image = "<img>" + "<IMG_CONTEXT>" * (processor.settings.tokens_per_tile * tiles) + "</img>"
    assert tokenizer.decode(ids) == rendered.replace("<IMG_CONTEXT>", image)
    # Token by token: a labelled position holds its own input id; the labelled runs are exactly
    # the three answers, each with its end-of-turn marker, each after the assistant header.
    header = processor.token_ids("<|im_start|>assistant\n")
    spans = runs(labels)
    assert [tokenizer.decode(ids[start:end]) for start, end in spans] == ["red<|im_end|>", "2<|im_end|>", "yes, it is<|im_end|>"]
    for start, end in spans:
        assert labels[start:end] == ids[start:end]
        assert ids[start - len(header):start] == header and set(labels[start - len(header):start]) == {IGNORE}
    assert sum(label != IGNORE for label in labels) == sum(len(processor.token_ids(t.text + "<|im_end|>"))
                                                          for t in TURNS if t.role == ASSISTANT)
    # The user turns, the image and the chat markup carry no label.
    assert all(labels[position] == IGNORE for position, token in enumerate(ids) if token == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))


def test_text_only_conversation_has_no_tile_and_trains(model: PerceptioModel) -> None:
    processor = model.processor
    encoded = processor.encode_conversation(None, TURNS[:2])
    assert encoded["pixel_values"].shape[0] == 0 and "<img>" not in model.tokenizer.decode(encoded["input_ids"].tolist())
    output = model(processor.collate([encoded, processor.encode_conversation(None, TURNS[2:4])]))
    assert torch.isfinite(output.loss) and output.terms["seg_bce"] == 0


def grounded_sample() -> tuple[ShardSample, list[np.ndarray]]:
    masks = [np.zeros((48, 64), np.uint8), np.zeros((48, 64), np.uint8)]
    masks[0][4:20, 4:24] = 1
    masks[1][26:44, 30:60] = 1
    caption = "The scene shows a red cube and two blue spheres."
    phrases = [{"text": "a red cube", "start": 16, "end": 26, "mask": mask_to_rle(masks[0])},
               {"text": "two blue spheres", "start": 31, "end": 47, "mask": mask_to_rle(masks[1])}]
    buffer = __import__("io").BytesIO()
    picture(3).save(buffer, format="PNG")
    meta = {"dataset": "grandf-ha", "split": "train", "image_id": 0, "file_name": "a.png", "width": 64, "height": 48,
            "teacher": None, "tokenizer": None, "refs": [], "source_id": "a.png",
            "grounded_caption": {"caption": caption, "phrases": phrases}}
    return ShardSample("grandf-ha_train_000000000000", buffer.getvalue(), None, None, meta), masks


def test_two_mask_grounded_caption_pairs_each_seg_with_its_mask(model: PerceptioModel) -> None:
    sample, masks = grounded_sample()
    [example] = expand_sample({"__key__": sample.key, **sample.to_members()}, PromptTemplates.load())
    assert example.target == f"The scene shows a red cube {SEG} and two blue spheres {SEG}."
    assert example.target == grounded_target(sample.meta["grounded_caption"]["caption"], sample.meta["grounded_caption"]["phrases"])
    assert example.prompt in PromptTemplates.load().caption_prompts and example.depth_bytes is None
    processor = model.processor
    encoded = processor.encode_conversation(**example.decode())
    ids, labels = encoded["input_ids"].tolist(), encoded["labels"].tolist()
    seg_id = model.seg_token_id
    seg_positions = [position for position, label in enumerate(labels) if label == seg_id]
    assert len(seg_positions) == 2 and [ids[p] for p in seg_positions] == [seg_id, seg_id]
    [(start, end)] = runs(labels)
    assert model.tokenizer.decode(ids[start:end]) == example.target + "<|im_end|>"
    assert encoded["num_masks"] == 2
    for index, mask in enumerate(masks):
        assert torch.equal(encoded["gt_masks"][index], processor.mask_target(mask))

    # In a batch with a one-mask referring example and a text-only one: three (row, [SEG], mask) pairs.
    referring = processor.encode_example(picture(5), "Segment the cube.", f"{SEG} a cube", masks[0], None)
    text_only = processor.encode_conversation(None, TURNS[:2])
    batch = processor.collate([text_only, encoded, referring])
    assert batch["gt_masks"].shape[:2] == (3, 2) and batch["num_masks"].tolist() == [0, 2, 1]
    rows, positions, mask_index = losses.seg_pairs(batch["labels"], seg_id, batch["num_masks"])
    assert rows.tolist() == [1, 1, 2] and mask_index.tolist() == [0, 1, 0]
    assert positions[:2].tolist() == seg_positions

    torch.manual_seed(0)
    output = model(batch)
    # The segmentation loss is over all three pairs: recompute it from SAM2 one [SEG] at a time.
    with torch.no_grad():
        hidden = model.adapter.last_hidden_state(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        logits = torch.cat([model.segmenter(batch["sam_pixel_values"][row:row + 1], hidden[row:row + 1, position])
                            for row, position in zip(rows.tolist(), positions.tolist())])
        bce, dice = losses.segmentation_losses(logits, batch["gt_masks"][rows, mask_index])
        first_only = losses.segmentation_losses(logits[:1], batch["gt_masks"][1, :1])[1]
    assert output.terms["seg_bce"] == pytest.approx(float(bce), rel=1e-4)
    assert output.terms["seg_dice"] == pytest.approx(float(dice), rel=1e-4)
    assert float(first_only) != pytest.approx(float(dice), rel=1e-3)  # not the first [SEG]'s loss alone
    output.loss.backward()
    assert model.segmenter.projector[0].weight.grad.abs().sum() > 0


def test_generation_prompt_is_the_training_context_of_each_answer(model: PerceptioModel) -> None:
    """What the predictor feeds before answer k is token for token what training put before it."""
    processor = model.processor
    for image in (picture(), None):
        encoded = processor.encode_conversation(image, TURNS)
        ids, labels = encoded["input_ids"].tolist(), encoded["labels"].tolist()
        tiles = encoded["pixel_values"].shape[0] if image is not None else None
        for (start, _), answer in zip(runs(labels), range(1, len(TURNS), 2)):
            prompt = processor.token_ids(processor.conversation_prompt(TURNS[:answer], tiles))
            assert prompt == ids[:start]


def test_all_families_mix_by_weight_into_trainable_batches(model: PerceptioModel, synth_world, tmp_path) -> None:
    """refcoco, llava and grandf shards in one weighted mix: every family drawn, every batch trains."""
    import shutil
    from collections import Counter
    from itertools import islice

    from perceptio.curate.conversations import GRANDF, LLAVA, ConversationRequest, curate_conversations
    from perceptio.sources.synth.conversations import write_conversations
    from perceptio.train.config import StreamConfig
    from perceptio.train.data import ExampleReader, ReaderSlot, ResumableLoader, parse_mix, plan_streams
    from tests.train_factory import write_shards

    world = tmp_path / "world"
    shutil.copytree(synth_world, world)
    write_conversations(world)
    shards = tmp_path / "shards"
    write_shards(shards / "refcoco", "refcoco-unc", shards=1, images_per_shard=3)
    for kind, source in ((LLAVA, "llava/synth_train.json"), (GRANDF, "GranDf/annotations/train/GranDf_HA_GCG_train.json")):
        curate_conversations(ConversationRequest(kind, world / source, world, shards / kind, progress=False))
    config = StreamConfig(shards=[shards / "refcoco", shards / "llava", shards / "grandf"],
                          mix=parse_mix("refcoco=1,llava=2,grandf=0.5"), shuffle_buffer=4, shuffle_initial=2)
    streams = plan_streams(config)
    assert {stream.name: stream.datasets for stream in streams} == {
        "grandf": ("grandf-ha",), "llava": ("llava",), "refcoco": ("refcoco-unc",)}
    drawn = Counter(example.source for example in islice(ExampleReader(streams, ReaderSlot(), config), 350))
    assert drawn["llava"] > drawn["refcoco-unc"] > drawn["grandf-ha"] > 0  # weights 2 : 1 : 0.5
    loader = ResumableLoader(config, model.processor, batch_size=4)
    for _ in range(2):
        batch = next(loader)
        output = model(batch.inputs)
        assert torch.isfinite(output.loss)
        output.loss.backward()
