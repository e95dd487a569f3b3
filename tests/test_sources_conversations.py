"""The LLaVA-1.5 and GranD-f readers on hand-written files in the distributed formats (tests/data/)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from perceptio.sources.masks import segmentation_to_mask
from perceptio.sources.problems import BadImage
from perceptio.errors import PerceptioError
from perceptio.sources.grandf import GrandfDataset
from perceptio.sources.llava import LlavaDataset

DATA = Path(__file__).parent / "data"
LLAVA_JSON = DATA / "llava" / "llava_v1_5_mix665k_sample.json"


def _jpeg(path: Path, size: tuple[int, int] = (16, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path, format="JPEG")


@pytest.fixture()
def llava_images(tmp_path: Path) -> Path:
    _jpeg(tmp_path / "coco/train2017/000000033471.jpg")
    _jpeg(tmp_path / "gqa/images/2354786.jpg")
    broken = tmp_path / "textvqa/train_images/0badc0de.jpg"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return tmp_path


def test_llava_reads_multi_turn_text_only_and_trailing_placeholder(llava_images: Path) -> None:
    data = LlavaDataset(LLAVA_JSON, llava_images)
    by_id = {conversation.id: conversation for conversation in data.conversations}
    bus = by_id["000000033471"]
    assert [turn.role for turn in bus.turns] == ["user", "assistant", "user", "assistant"]
    assert bus.turns[0].text == "Which colours does the bus have?"  # placeholder and its newline gone
    assert bus.turns[3].text == "An advertisement for a local bakery."
    assert by_id["i6IyJda_0"].image is None and data.load_image(by_id["i6IyJda_0"]) is None
    assert by_id["2354786"].turns[0].text == "Is the sky cloudy?"
    assert data.load_image(bus).size == (16, 12)
    # Positions in the file are the integer ids: unique even where record ids repeat.
    assert [conversation.index for conversation in data.conversations] == sorted({c.index for c in data.conversations})


def test_llava_rejects_bad_records_with_a_reason(llava_images: Path) -> None:
    data = LlavaDataset(LLAVA_JSON, llava_images)
    reasons = {str(problem.id): problem.kind for problem in data.problems}
    assert reasons == {
        "no-placeholder": "placeholder_mismatch",
        "two-placeholders": "placeholder_mismatch",
        "placeholder-in-answer": "placeholder_mismatch",
        "text-only-with-placeholder": "placeholder_mismatch",
        "no-turns": "empty_conversation",
        "answer-first": "bad_turns",
        "question-last": "bad_turns",
        "empty-answer": "empty_conversation",
        "13": "bad_record",
    }
    assert "0 <image> placeholder(s) for 1 image(s)" in next(str(p) for p in data.problems if p.id == "no-placeholder")


def test_llava_missing_and_corrupt_images_fail_lazily(llava_images: Path) -> None:
    data = LlavaDataset(LLAVA_JSON, llava_images)
    by_id = {conversation.id: conversation for conversation in data.conversations}
    for record_id, kind in (("missing-file", "missing_image"), ("broken-file", "corrupt_image")):
        with pytest.raises(BadImage) as raised:
            data.load_image(by_id[record_id])
        assert raised.value.problem.kind == kind and raised.value.problem.id == record_id


def test_llava_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(PerceptioError, match="not found"):
        LlavaDataset(tmp_path / "absent.json", tmp_path)
    (tmp_path / "object.json").write_text('{"id": 1}')
    with pytest.raises(PerceptioError, match="expected a list"):
        LlavaDataset(tmp_path / "object.json", tmp_path)
    (tmp_path / "cut.json").write_text('[{"id": ')
    with pytest.raises(PerceptioError, match="not readable JSON"):
        LlavaDataset(tmp_path / "cut.json", tmp_path)
    with pytest.raises(PerceptioError, match="images root"):
        LlavaDataset(LLAVA_JSON, tmp_path / "no-images")


def test_grandf_groundings_layout(tmp_path: Path) -> None:
    _jpeg(tmp_path / "sa_10010541.jpg")
    data = GrandfDataset(DATA / "grandf" / "GranDf_HA_GCG_train.json", tmp_path)
    assert (data.name, data.split) == ("grandf-ha", "train")
    [record] = data.captions
    assert [phrase.text for phrase in record.phrases] == ["A red box", "two blue balls"]
    assert all(record.caption[p.start:p.end] == p.text for p in record.phrases)
    # "two blue balls" is grounded by two masks, merged into one.
    balls = segmentation_to_mask(record.phrases[1].segmentation, 12, 16)
    assert balls[6:11, 8:14].all() and balls[1:4, 10:15].all() and balls.sum() == 30 + 15
    assert data.load_image(record).size == (16, 12)
    reasons = {str(problem.id): problem.kind for problem in data.problems}
    assert reasons == {"sa_2.jpg": "phrase_mismatch", "sa_3.jpg": "phrase_mismatch", "sa_4.jpg": "phrase_mismatch",
                       "sa_5.jpg": "empty_conversation", "sa_6.jpg": "no_phrases", "sa_7.jpg": "phrase_mismatch"}
    details = {str(problem.id): problem.reason for problem in data.problems}
    assert "has no mask" in details["sa_3.jpg"] and "overlap" in details["sa_4.jpg"]
    assert "not the phrase" in details["sa_2.jpg"] and "outside" in details["sa_7.jpg"]


def test_grandf_refs_layout_finds_sentences_and_trims_overlaps(tmp_path: Path) -> None:
    data = GrandfDataset(DATA / "grandf" / "RefCOCOg_GCG_val.json", tmp_path)
    assert (data.name, data.split) == ("grandf-refcocog", "val")
    first, second = data.captions
    assert [phrase.text for phrase in first.phrases] == ["A man in a red shirt", "a small dog"]  # caption order
    assert first.file_name == "COCO_train2014_000000000001.jpg"
    man = segmentation_to_mask(first.phrases[0].segmentation, 12, 16)
    assert man[3, 2] == 1 and man[9, 10] == 0
    assert [phrase.text for phrase in second.phrases] == ["A man in", "a red shirt"]
    kinds = sorted((problem.kind, str(problem.id)) for problem in data.problems)
    assert kinds == [("no_phrases", "COCO_train2014_000000000003.jpg"),
                     ("phrase_not_in_caption", "COCO_train2014_000000000001.jpg"),
                     ("phrase_not_in_caption", "COCO_train2014_000000000003.jpg")]


def test_grandf_coco_layout_skips_ignored_annotations_and_checks_size(tmp_path: Path) -> None:
    data = GrandfDataset(DATA / "grandf" / "flickr_mergedGT_GCG_val.json", tmp_path)
    [record] = data.captions
    assert [phrase.text for phrase in record.phrases] == ["Two dogs", "the grass"]  # the ignored fence is out
    assert (record.width, record.height) == (16, 12)
    assert [(problem.kind, problem.id) for problem in data.problems] == [("phrase_mismatch", "10002456.jpg")]
    _jpeg(tmp_path / "1000092795.jpg", size=(20, 12))
    with pytest.raises(BadImage) as raised:
        data.load_image(record)
    assert raised.value.problem.kind == "size_mismatch"


def test_grandf_unknown_file_names_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "my_gcg.json"
    shutil.copy(DATA / "grandf" / "GranDf_HA_GCG_train.json", copy)
    with pytest.raises(PerceptioError, match="not a GranD-f GCG file name"):
        GrandfDataset(copy, tmp_path)
    assert GrandfDataset(DATA / "grandf" / "GranDf_HA_GCG_train.json", tmp_path, split="val").split == "val"
