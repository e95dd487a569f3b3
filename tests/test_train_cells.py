"""--cell-embeddings: which token is which cell, the vectors reaching the language model, training,
export, and generation with a key-value cache continuing a span's cells."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from perceptio.errors import PerceptioError
from perceptio.tokens import SEG, depth_span
from perceptio.train.cells import image_token_cells, span_cells
from perceptio.train.chat import ASSISTANT, USER, Turn
from perceptio.train.config import PerceptioConfig
from perceptio.train.model import TERMS, PerceptioModel
from tests.test_train_model import DESCRIPTION, example_parts, mixed_batch

START, END = 1, 2  # marker ids of the hand-made sequences below; codes and text are the other ids


def loop_cells(ids: list[int], cells: int) -> list[int]:
    """The reference: walk the sequence, counting tokens since the last open [D_START]."""
    out, inside, count = [], False, 0
    for token in ids:
        if token == START:
            inside, count = True, 0
            out.append(-1)
        elif token == END:
            inside = False
            out.append(-1)
        else:
            out.append(count if inside and count < cells else -1)
            count += inside
    return out


def random_sequences(rng: np.random.Generator, rows: int, length: int) -> torch.Tensor:
    ids = rng.integers(3, 20, (rows, length))
    ids[rng.random((rows, length)) < 0.04] = START
    ids[rng.random((rows, length)) < 0.03] = END
    return torch.as_tensor(ids)


def test_span_cells_count_tokens_since_the_open_marker_whole_or_one_token_at_a_time():
    rng = np.random.default_rng(0)
    ids = random_sequences(rng, 6, 90)
    expected = torch.tensor([loop_cells(row, 16) for row in ids.tolist()])
    whole, _ = span_cells(ids, START, END, 16)
    assert torch.equal(whole, expected)
    assert (expected >= 0).any() and (expected == 15).any()  # spans long enough to run past the grid
    # A prompt of 30 tokens, then one token per call carrying the open spans' lengths.
    first, carried = span_cells(ids[:, :30], START, END, 16)
    steps = [first]
    for position in range(30, ids.shape[1]):
        cell, carried = span_cells(ids[:, position:position + 1], START, END, 16, carried)
        steps.append(cell)
    assert torch.equal(torch.cat(steps, 1), expected)


def test_image_tokens_take_the_cell_under_their_centre():
    assert torch.equal(image_token_cells(100, 10), torch.arange(100))
    cells = image_token_cells(256, 10)
    for token in (0, 17, 130, 255):
        row, column = divmod(token, 16)
        assert cells[token] == int((row + 0.5) / 16 * 10) * 10 + int((column + 0.5) / 16 * 10)
    assert sorted(set(cells.tolist())) == list(range(100))
    with pytest.raises(ValueError):
        image_token_cells(250, 10)


def build(vqvae_dir, **changes) -> PerceptioModel:
    torch.manual_seed(0)
    config = PerceptioConfig(model="tiny", tokenizer=str(vqvae_dir), lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                             cell_embeddings=True)
    return PerceptioModel.from_config(dataclasses.replace(config, **changes))


@pytest.fixture(scope="module")
def model(vqvae_dir):
    built = build(vqvae_dir)
    with torch.no_grad():  # vectors large enough that a wrong cell shows in the logits
        built.cell_embeddings.table.weight.normal_(0, 1.0)
    return built


def language_model_inputs(model: PerceptioModel, batch: dict) -> torch.Tensor:
    """The input embeddings (B, T, D) the language model receives for ``batch``."""
    seen = []
    hook = model.adapter.language_model().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model.hidden_states(batch)
    finally:
        hook.remove()
    return seen[0]


def test_the_vectors_reach_the_image_tokens_and_the_span_codes_and_nothing_else(model):
    batch = mixed_batch(model)
    with_cells = language_model_inputs(model, batch)
    table = model.cell_embeddings.table.weight.detach().clone()
    with torch.no_grad():
        model.cell_embeddings.table.weight.zero_()
    try:
        without = language_model_inputs(model, batch)
    finally:
        with torch.no_grad():
            model.cell_embeddings.table.weight.copy_(table)
    added = with_cells - without
    ids = batch["input_ids"]
    image = ids == model.adapter.model.config.image_token_id
    for row in range(ids.shape[0]):  # one tile per picture: its tokens in the tile's row-major order
        assert torch.allclose(added[row][image[row]], table[model.cell_embeddings.image_cells], atol=1e-5)
    start = (ids[0] == model.d_start_id).nonzero().item()
    assert torch.allclose(added[0, start + 1:start + 101], table, atol=1e-5)  # the k-th code gets cell k
    elsewhere = ~image
    elsewhere[0, start + 1:start + 101] = False
    assert added[elsewhere].abs().max() == 0  # markers, prompt and answer text, the span-less row


def test_the_table_trains_and_survives_both_exports(model, tmp_path):
    batch = mixed_batch(model)
    model.train()
    model(batch).loss.backward()
    gradient = model.cell_embeddings.table.weight.grad
    assert gradient is not None and gradient.abs().sum() > 0
    model.zero_grad()
    assert "cell_embeddings.table.weight" in model.trainable_state_dict()
    model.eval()
    with torch.no_grad():
        expected = model(batch).terms
    for merged in (False, True):
        reloaded = PerceptioModel.from_pretrained(model.save_pretrained(tmp_path / "export", merged=merged)).eval()
        assert torch.equal(reloaded.cell_embeddings.table.weight, model.cell_embeddings.table.weight)
        with torch.no_grad():
            terms = reloaded(batch).terms
        for name in TERMS:
            assert torch.allclose(terms[name], expected[name], atol=1e-4), (merged, name)


def test_generation_with_a_cache_continues_the_span_cells(model):
    """Greedy steps with a key-value cache give the logits of full forwards of the same sequence
    (the cells of a span begun in the prompt, continued token by token); without the tracking the
    cached steps would restart at no cell and differ."""
    parts = example_parts()
    codes = np.random.default_rng(1).integers(0, 128, 100)
    example = model.processor.encode_example(parts["image"], parts["prompt"], f"{SEG}{depth_span(codes)} {DESCRIPTION}")
    ids = example["input_ids"]
    prompt = ids[: (ids == model.d_start_id).nonzero().item() + 40][None]  # 39 codes of the span written
    model.eval()

    def scores(tracked: bool, cache: bool) -> torch.Tensor:
        tracking = model.cell_embeddings.decoding() if tracked else contextlib.nullcontext()
        with torch.inference_mode(), tracking:
            output = model.adapter.model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=example["pixel_values"],
                max_new_tokens=6, do_sample=False, use_cache=cache, output_scores=True, return_dict_in_generate=True,
                pad_token_id=model.tokenizer.pad_token_id, suppress_tokens=[model.d_end_id])
        return torch.stack(output.scores)

    uncached = scores(tracked=True, cache=False)
    assert torch.allclose(scores(tracked=True, cache=True), uncached, atol=1e-4)
    assert not torch.allclose(scores(tracked=False, cache=True), uncached, atol=1e-2)


def test_cell_embeddings_need_one_whole_tile_and_a_square_grid():
    with pytest.raises(PerceptioError, match="crop-to-patches"):
        PerceptioConfig(model="tiny", cell_embeddings=True, crop_to_patches=True)
    with pytest.raises(PerceptioError, match="square"):
        PerceptioConfig(model="tiny", cell_embeddings=True, num_depth_tokens=50)


def test_hidden_cells_of_a_short_span_are_masked_and_change_nothing_after_them(model):
    parts = example_parts()
    codes = np.random.default_rng(2).integers(0, 128, 100)
    hidden = tuple(range(0, 100, 3))
    recoded = codes.copy()
    recoded[list(hidden)] = (recoded[list(hidden)] + 1) % 128

    def encoded(span_codes: np.ndarray) -> dict:
        turns = [Turn(USER, parts["prompt"]), Turn(ASSISTANT, f"{depth_span(span_codes)}(B)")]
        return model.processor.encode_conversation(parts["image"], turns, span_is_context=True, hidden_cells=hidden)

    example = encoded(codes)
    start = (example["input_ids"] == model.d_start_id).nonzero().item()
    masked = (example["attention_mask"] == 0).nonzero().flatten().tolist()
    assert masked == [start + 1 + cell for cell in hidden]
    assert (example["labels"][masked] == -100).all()
    short = model.processor.encode_conversation(parts["image"], [Turn(USER, "Hi"), Turn(ASSISTANT, "(A)")])
    batch = model.processor.collate([example, short])
    assert batch["attention_mask"][1].sum() == len(short["input_ids"])  # padding after the shorter row
    model.eval()
    with torch.no_grad():
        states = [model.hidden_states(model.processor.collate([encoded(span), short]))[0] for span in (codes, recoded)]
    visible = example["attention_mask"].bool()
    assert torch.allclose(states[0][visible], states[1][visible], atol=1e-5)
    with pytest.raises(ValueError):
        model.processor.encode_conversation(parts["image"], [Turn(USER, "Hi"), Turn(ASSISTANT, depth_span(codes))],
                                            hidden_cells=hidden)
