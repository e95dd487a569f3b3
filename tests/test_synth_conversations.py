"""The synthetic world's LLaVA conversations and GranD-f grounded captions, checked against world.json."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptio.sources.masks import segmentation_to_mask
from perceptio.sources.synth import generate_world
from perceptio.sources.synth.conversations import write_conversations
from perceptio.sources.grandf import GrandfDataset
from perceptio.sources.llava import LlavaDataset


def _hashes(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], dict[str, str]]:
    root = tmp_path_factory.mktemp("conversations") / "world"
    generate_world(root, images=12, seed=3, workers=1)
    before = _hashes(root)
    write_conversations(root)
    return root, before, _hashes(root)


def test_the_world_is_untouched_and_the_files_are_deterministic(world, tmp_path: Path) -> None:
    root, before, after = world
    added = sorted(set(after) - set(before))
    assert {name: after[name] for name in before} == before
    assert added == ["GranDf/annotations/train/GranDf_HA_GCG_train.json", "GranDf/annotations/train/GranDf_HA_GCG_val.json",
                     "llava/synth_train.json", "llava/synth_val.json"]
    again = tmp_path / "world"
    generate_world(again, images=12, seed=3, workers=2)
    write_conversations(again)
    assert _hashes(again) == after


def _objects(world_json: dict, image: str) -> list[dict]:
    return next(record["objects"] for record in world_json["images"] if record["file"] == image)


def _find(objects: list[dict], name: str) -> dict:
    colour, shape = name.removeprefix("the ").split(" ")
    [found] = [obj for obj in objects if (obj["colour"], obj["shape"]) == (colour, shape)]
    return found


def _expected(question: str, objects: list[dict]) -> str:
    """The answer, worked out here from world.json independently of the writer."""
    if match := re.fullmatch(r"How many (\w+)s are there in the image\?", question):
        return str(sum(obj["shape"] == match[1] for obj in objects))
    if match := re.fullmatch(r"What colour is the (\w+)\?", question):
        [obj] = [obj for obj in objects if obj["shape"] == match[1]]
        return obj["colour"]
    if match := re.fullmatch(r"Is (the \w+ \w+) to the left or to the right of (the \w+ \w+)\?", question):
        a, b = _find(objects, match[1]), _find(objects, match[2])
        return "left" if a["image_centre"][0] < b["image_centre"][0] else "right"
    if match := re.fullmatch(r"Which is bigger, (the \w+ \w+) or (the \w+ \w+)\?", question):
        a, b = _find(objects, match[1]), _find(objects, match[2])
        return match[1] if a["volume_m3"] > b["volume_m3"] else match[2]
    if match := re.fullmatch(r"A box holds (.+)\. How many objects are in the box\?", question):
        words = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
        return str(sum(words.index(count) for count in re.findall(r"(\w+) \w+?s?(?:,| and|$)", match[1])))
    raise AssertionError(f"unexpected question {question!r}")


def test_every_llava_answer_follows_from_world_json(world) -> None:
    root = world[0]
    world_json = json.loads((root / "world.json").read_text())
    checked = 0
    for split in ("train", "val"):
        data = LlavaDataset(root / "llava" / f"synth_{split}.json", root)
        assert data.problems == []
        for conversation in data.conversations:
            turns = conversation.turns
            assert len(turns) >= 2 and len(turns) % 2 == 0
            if conversation.image is None:
                assert _expected(turns[0].text, []) == turns[1].text
                checked += 1
                continue
            objects = _objects(world_json, conversation.image)
            for question, answer in zip(turns[::2], turns[1::2]):
                assert _expected(question.text, objects) == answer.text, question.text
                checked += 1
            assert data.load_image(conversation).size == (world_json["config"]["width"], world_json["config"]["height"])
    assert checked > 30


def test_grounded_phrases_point_at_the_instance_masks(world) -> None:
    root = world[0]
    world_json = json.loads((root / "world.json").read_text())
    records = {record["file"]: record for record in world_json["images"]}
    total = 0
    for split in ("train", "val"):
        data = GrandfDataset(root / "GranDf/annotations/train" / f"GranDf_HA_GCG_{split}.json", root)
        assert data.problems == [] and data.name == "grandf-ha"
        for caption in data.captions:
            record = records[caption.file_name]
            instances = np.asarray(Image.open(root / record["instance_file"]))
            groups = {(obj["colour"], obj["shape"]) for obj in record["objects"]}
            assert len(caption.phrases) == len(groups)
            for phrase in caption.phrases:
                *_, colour, shape = phrase.text.split(" ")
                members = [obj["instance"] for obj in record["objects"]
                           if obj["colour"] == colour and obj["shape"] == shape.removesuffix("s")]
                expected = np.isin(instances, members)
                mask = segmentation_to_mask(phrase.segmentation, *instances.shape)
                assert np.array_equal(mask.astype(bool), expected)
                total += 1
    assert total >= 12
