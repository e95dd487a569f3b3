"""The eye benchmark (benchmarks/eye_depth.py): what each image token is asked to read, an eye that
learns it, the neighbourhoods the probe reads, and a HardBLINK question answered from the depth an
eye reads, block by block in the right places."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.shards import iter_shard, list_shards
from perceptio.train.eye_depth import token_depth_blocks
from tests.train_factory import write_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eye_depth  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_picture_keeps_its_codes_and_the_depth_blocks_under_its_tokens(tmp_path):
    write_shards(tmp_path, "ade20k", split="training", shards=2, images_per_shard=3)
    pictures = eye_depth.load_pictures([tmp_path], eye_depth._tile(280))
    samples = [sample for shard in list_shards(tmp_path) for sample in iter_shard(shard.path)]
    assert pictures.pixels.shape == (6, 3, 280, 280)
    assert pictures.codes.tolist() == [sample.depth_tokens.astype(int).tolist() for sample in samples]
    expected = token_depth_blocks(torch.stack([torch.from_numpy(s.depth.astype(np.float32)) for s in samples]), 10)
    assert torch.equal(pictures.blocks, expected)
    # The first N pictures, across shards and folders.
    first = eye_depth.load_pictures([tmp_path, tmp_path], eye_depth._tile(280), limit=4)
    assert first.codes.tolist() == pictures.codes[:4].tolist()
    assert len(eye_depth.load_pictures([tmp_path, tmp_path], eye_depth._tile(280)).codes) == 12


def test_a_fitted_eye_reads_the_codes_better_than_each_cells_most_frequent_code(tmp_path, monkeypatch, capsys):
    """The stand-in codes mark the box's cells and the background's brightness: an eye that looks
    at the picture beats the per-cell prior on the pictures it was fitted on."""
    write_shards(tmp_path / "shards", "ade20k", split="training", shards=2, images_per_shard=4)
    out = tmp_path / "fit.json"
    monkeypatch.setattr(sys, "argv", ["eye_depth.py", "--fit", "--train", str(tmp_path / "shards"), "--heldout",
                                      str(tmp_path / "shards"), "--steps", "150", "--batch-size", "8", "--lr", "3e-3",
                                      "--out", str(out)])
    eye_depth.main()
    record = json.loads(out.read_text())
    assert record["heldout"]["accuracy"] > record["prior"]["accuracy"] + 0.1
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["eye_parameters"] > 0 and record == {"arguments": record["arguments"], **printed}
    assert record["arguments"]["steps"] == "150"


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["eye_depth.py", "--fit", "--train", str(tmp_path / "empty"), "--heldout",
                                      str(tmp_path / "empty")])
    with pytest.raises(SystemExit) as exit_:
        eye_depth.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: no pictures with depth in {tmp_path / 'empty'}"]


def test_neighbourhoods_hold_each_token_and_its_eight_neighbours():
    tokens = torch.arange(2 * 9 * 2, dtype=torch.float32).reshape(2, 9, 2)  # two 3x3 grids, width 2
    around = eye_depth.neighbourhoods(tokens)
    assert around.shape == (2, 9, 18)
    grid = tokens.reshape(2, 3, 3, 2)
    for row in range(3):
        for column in range(3):
            expected = []
            for d_row in (-1, 0, 1):
                for d_column in (-1, 0, 1):
                    r, c = row + d_row, column + d_column
                    expected.append(grid[:, r, c] if 0 <= r < 3 and 0 <= c < 3 else torch.zeros(2, 2))
            # neighbour-major, then width: the layout of torch.cat over the 9 shifted grids
            assert torch.equal(around[:, row * 3 + column].reshape(2, 9, 2), torch.stack(expected, 1))


def test_the_blocks_go_back_to_the_map_they_were_cut_from():
    depth = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 320, 320)).astype(np.float32))
    pooled = torch.nn.functional.adaptive_avg_pool2d(depth[None], 20)[0, 0]
    assert torch.allclose(eye_depth.depth_map(token_depth_blocks(depth, 10)[0]), pooled)


def write_question(root: Path, world: Path, points: list[list[int]], answer: str) -> None:
    """A one-question synthetic HardBLINK split (3 points) whose source picture is in ``world``."""
    (root / "questions").mkdir(parents=True)
    (root / "answers").mkdir()
    (root / "images" / "blink3pointscenter").mkdir(parents=True)
    Image.new("RGB", (120, 80)).save(root / "images" / "blink3pointscenter" / "0.png")
    world.mkdir()
    Image.new("RGB", (120, 80)).save(world / "source.png")
    row = {"question_id": 0, "image": "0.png", "text": "Which point is closest?", "source_file": "source.png",
           "image_width": 120, "image_height": 80, "points": points, "labels": ["A", "B", "C"]}
    (root / "questions" / "blink_3pointscenter_questions.jsonl").write_text(json.dumps(row) + "\n")
    (root / "answers" / "blink_3pointscenter_answers.jsonl").write_text(json.dumps({"question_id": 0, "text": f"({answer})"}) + "\n")
    for variant in (4, 5):
        (root / "questions" / f"blink_{variant}pointscenter_questions.jsonl").write_text("")
        (root / "answers" / f"blink_{variant}pointscenter_answers.jsonl").write_text("")


@pytest.mark.parametrize("answer, right", [("B", 1.0), ("A", 0.0)])
def test_a_question_is_answered_where_the_read_depth_is_nearest(tmp_path, answer, right):
    points = [[10, 10], [115, 77], [60, 40]]  # B: in the bottom-right cell of the 10x10 grid
    write_question(tmp_path / "blink", tmp_path / "world", points, answer)
    depth = torch.full((1, 320, 320), -1.0)
    depth[0, 288:, 288:] = 1.0  # near only under B

    def read(pixels: torch.Tensor) -> torch.Tensor:  # an eye that reads the true depth blocks
        return token_depth_blocks(depth, 10)

    scores = eye_depth.blink_accuracy(read, "depth", tmp_path / "blink", tmp_path / "world", None, eye_depth._tile(280))
    assert scores == {"eye_alone_choice": right, "questions": 1}
