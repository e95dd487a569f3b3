"""The trainer-form lookup benchmark (benchmarks/trainer_reading.py): the trainer's text reading questions,
its model and processor, the letter found where the answer writes it."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from perceptio.shards import iter_shard, list_shards
from perceptio.tokens import depth_span
from perceptio.train.chat import ASSISTANT, USER, Turn
from perceptio.train.config import PerceptioConfig
from perceptio.train.data import Example, token_grid_nearness
from perceptio.train.model import PerceptioModel
from tests.train_factory import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from trainer_reading import code_nearness, letter_ids, letter_logits, table_answer, text_reading_questions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_questions_are_the_text_ones_and_the_letter_is_read_where_the_answer_writes_it(tmp_path, vqvae_dir):
    write_shards(tmp_path, "ade20k", split="training", shards=1, images_per_shard=3, questions=True)
    examples = list(islice(text_reading_questions(tmp_path, seed=0, swaps=1.0), 6))
    assert all("/t" in example.key and example.image_bytes is None for example in examples)
    torch.manual_seed(0)
    model = PerceptioModel.from_config(PerceptioConfig(model="tiny", tokenizer=str(vqvae_dir), train_language_model=True,
                                                       span_weight=0.0, use_segmentation=False)).eval()
    letters = letter_ids(model)
    batch = model.processor.collate([model.processor.encode_conversation(**example.decode()) for example in examples])
    logits, answers = letter_logits(model, batch, letters)
    with torch.no_grad():
        full = model.adapter.output_head()(model.hidden_states(batch))
    for row, example in enumerate(examples):
        answer = example.target.rsplit("(", 1)[1][0]  # "...[D_END](B)"
        assert letters[answers[row]] == model.processor.token_ids(f"({answer})")[1]
        # The logits at the position that predicts the letter: the one before it in the sequence.
        position = (batch["labels"][row] == letters[answers[row]]).nonzero()[-1].item()
        assert batch["input_ids"][row, position] == letters[answers[row]]
        assert torch.allclose(logits[row], full[row, position - 1, letters], atol=1e-5)


def test_a_short_run_writes_its_curve(tmp_path, vqvae_dir):
    train, heldout = tmp_path / "train", tmp_path / "heldout"
    write_shards(train, "ade20k", split="training", shards=1, images_per_shard=3, questions=True)
    write_shards(heldout, "ade20k", split="training", shards=1, images_per_shard=2, first_image_id=50, questions=True)
    out = tmp_path / "curve.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trainer_reading.py"), "--model", "tiny", "--tokenizer",
                    str(vqvae_dir), "--shards", str(train), "--heldout-shards", str(heldout), "--steps", "2",
                    "--batch-size", "4", "--heldout", "64", "--loss", "letter", "--out", str(out)],
                   check=True, capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    curve = json.loads(out.read_text())["curve"]
    assert [point["step"] for point in curve] == [2] and 0 <= curve[0]["swapped_questions"] <= 1


def test_the_perfect_lookup_compares_the_marks_codes_through_the_code_to_nearness_table(tmp_path):
    write_shards(tmp_path, "ade20k", split="training", shards=1, images_per_shard=3, questions=True)
    table = code_nearness(tmp_path, 128)
    samples = [sample for shard in list_shards(tmp_path) for sample in iter_shard(shard.path)]
    code = int(samples[0].depth_tokens[0])
    holding = [token_grid_nearness(sample.depth, 100).reshape(-1)[np.asarray(sample.depth_tokens) == code] for sample in samples]
    assert np.isclose(table[code], np.concatenate(holding).mean())
    codes = [0] * 100
    codes[1], codes[23] = 5, 9  # cell (0, 1) holds code 5, cell (2, 3) code 9
    asked = Example("k/t0", "ade20k", (Turn(USER, "A 0 1, B 2 3"), Turn(ASSISTANT, f"{depth_span(codes)}(A)")), None, (), None)
    nearer = np.zeros(128)
    nearer[9] = 1.0
    assert table_answer(asked, nearer) == "B" and table_answer(asked, -nearer) == "A"
