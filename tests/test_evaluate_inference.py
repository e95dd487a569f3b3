"""Inference and the perceptio-evaluate commands on the built-in tiny model (random weights).

One tiny checkpoint is built per module. A random model rarely writes [SEG] or a depth span by
itself, so the mask and depth paths are driven by a processor that makes the model choose [SEG]
and [D_START] first (as a trained model does); the format constraint does the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.evaluate.benchmarks import read_shard_items
from perceptio.evaluate.decoding import PerceptionFormatProcessor
from perceptio.evaluate.predict import Predictor
from tests.train_factory import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from perceptio.tokenize.vqvae import DepthVQVAE, DepthVQVAEConfig
    from perceptio.train.config import PerceptioConfig
    from perceptio.train.model import PerceptioModel

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    DepthVQVAE(DepthVQVAEConfig()).save_pretrained(folder / "tokenizer")
    config = PerceptioConfig(model="tiny", sam_model="tiny", tokenizer=str(folder / "tokenizer"), lora_rank=4, lora_alpha=8)
    return PerceptioModel.from_config(config).save_pretrained(folder / "model")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, max_new_tokens=110)


class ChoosesSegThenDepth(PerceptionFormatProcessor):
    """Forces [SEG] then [D_START] as the first two tokens, then applies the format constraint."""

    def __init__(self, base: PerceptionFormatProcessor, prompt_length: int, seg_id: int):
        super().__init__(base.depth_token_ids.tolist(), base.d_start_id, base.d_end_id, base.num_depth_tokens,
                         base.max_spans, base.max_length)
        self.prompt_length, self.seg_id = prompt_length, seg_id

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = {0: self.seg_id, 1: self.d_start_id}.get(step)
        if forced is not None:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, forced] = 0.0
            return scores
        return super().__call__(input_ids, scores)


def image(width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_prediction_gives_mask_depth_and_answer_from_one_sequence(predictor, monkeypatch):
    model = predictor.model
    original = predictor._processor
    monkeypatch.setattr(predictor, "_processor",
                        lambda width, starts: ChoosesSegThenDepth(original(width, starts), width, model.seg_token_id))
    picture = image(64, 48)
    prediction = predictor.predict(picture, "Please segment the object described as \"the red cube\".")
    ids = prediction.token_ids
    assert ids[0] == model.seg_token_id and ids[1] == model.d_start_id
    assert prediction.well_formed and len(prediction.depth_codes) == 100
    assert ids[102] == model.d_end_id
    # The mask is at the image's size (H, W), binary; the depth is the tokenizer's 320x320 decode.
    assert prediction.mask is not None and prediction.mask.shape == (48, 64)
    assert set(np.unique(prediction.mask)) <= {0, 1}
    assert prediction.depth is not None and prediction.depth.shape == (320, 320)
    expected_depth = model.depth_vqvae.decode(torch.tensor([prediction.depth_codes]))[0].numpy()
    np.testing.assert_allclose(prediction.depth, expected_depth)
    # The answer text carries no perception token.
    assert "[SEG]" not in prediction.text and "[D_" not in prediction.text
    assert prediction.text == model.tokenizer.decode(ids[103:], skip_special_tokens=True).strip()


def test_random_model_never_writes_a_malformed_span(predictor):
    prediction = predictor.predict(image(), "Which point is the closest to the camera?")
    vocabulary = predictor.vocabulary
    if vocabulary.d_start_id in prediction.token_ids:
        assert prediction.well_formed
    assert not set(prediction.token_ids) & set(vocabulary.depth_token_ids) or prediction.well_formed


def test_an_answer_prefix_is_written_for_the_model_and_counts_as_its_span(predictor):
    from perceptio.tokens import depth_span
    from perceptio.train.chat import USER, Turn

    model, vocabulary = predictor.model, predictor.vocabulary
    span = depth_span(range(100))
    picture, prompt = image(), "Which point is the closest to the camera? Write the depth of the scene first."
    given, free = predictor.predict_batch([picture, picture], [prompt, prompt], answer_prefixes=[span, ""])
    # The given span is the answer's one span: the model may not write another after it ...
    perception = {vocabulary.d_start_id, vocabulary.d_end_id, *vocabulary.depth_token_ids}
    assert not set(given.token_ids) & perception and given.depth_codes == [] and not given.well_formed
    # ... and what it writes first is its own greedy choice after the prompt and the span.
    processor = model.processor
    tile = processor.pixel_values(picture)
    ids = processor.token_ids(processor.conversation_prompt([Turn(USER, prompt)], len(tile)))
    ids += processor.tokenizer(span, add_special_tokens=False)["input_ids"]
    assert ids[-102:] == [vocabulary.d_start_id, *vocabulary.depth_token_ids[:100], vocabulary.d_end_id]
    with torch.no_grad():
        logits = model.adapter.model(input_ids=torch.tensor([ids]), pixel_values=tile).logits[0, -1]
    logits[sorted(perception)] = float("-inf")
    assert given.token_ids[0] == int(logits.argmax())
    # The row without a prefix, batched beside it, is answered as when asked alone.
    assert free.token_ids == predictor.predict(picture, prompt).token_ids
    with pytest.raises(ValueError, match="1 answer prefixes for 2 prompts"):
        predictor.predict_batch([picture, picture], [prompt, prompt], answer_prefixes=[span])


class WritesFirst:
    """Forces the first generated ids, then applies the predictor's own format constraint."""

    def __init__(self, base: PerceptionFormatProcessor, prompt_length: int, forced: list[int]):
        self.base, self.prompt_length, self.forced = base, prompt_length, forced

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.forced):
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.forced[step]] = 0.0
            return scores
        return self.base(input_ids, scores)


def test_readouts_written_after_a_given_span_are_collected(predictor, monkeypatch):
    from perceptio.tokens import depth_span

    model, vocabulary = predictor.model, predictor.vocabulary
    monkeypatch.setattr(model.config, "mark_readouts", True)  # a model trained with --mark-readouts
    letter, code = model.processor.token_ids(" A")[0], vocabulary.depth_token_ids[5]
    original, constraints = predictor._processor, []

    def processor(width, starts):
        constraints.append(original(width, starts))
        return WritesFirst(constraints[-1], width, [letter, code])

    monkeypatch.setattr(predictor, "_processor", processor)
    given = predictor.predict_batch([image()], ["Which point is the closest to the camera?"],
                                    answer_prefixes=[depth_span(range(100))])[0]
    assert [constraint.readouts for constraint in constraints] == [True]
    assert given.token_ids[:2] == [letter, code] and given.readout_codes[0] == 5
    assert given.readout_codes == [vocabulary.code_of()[token] for token in given.token_ids if token in vocabulary.code_of()]


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, "refcoco-unc", split="val", shards=1, images_per_shard=2, refs=1, sentences=2)
    write_shards(folder, "refcoco-unc", split="train", shards=1, images_per_shard=1)  # must be ignored
    return folder


def test_refseg_command_reports_scores_with_checkpoint_and_counts(evaluate, checkpoint, val_shards, tmp_path):
    out = tmp_path / "refseg.json"
    done = evaluate("refseg", "--checkpoint", str(checkpoint), "--shards", str(val_shards), "--split", "val",
                    "--limit", "3", "--max-new-tokens", "4", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results == json.loads(out.read_text())
    assert results["checkpoint"]["identity"].startswith("model@") and "(tiny)" in results["checkpoint"]["identity"]
    assert results["data"]["expressions"] == 3 and results["data"]["images"] == 2  # 2 sentences per image
    scores = results["scores"]["refcoco-unc/val"]
    assert scores["expressions"] == 3
    # With 4 new tokens a random model writes no [SEG]: every prediction empty, every GT non-empty.
    assert scores["missing_seg"] == 3 and scores["ciou"] == 0.0 and scores["giou"] == 0.0
    # Every expression's record, in the shards' order, with the prompt the model was asked.
    records = results["per_expression"]
    asked = read_shard_items([val_shards], "val")[:3]
    assert [(r["id"], r["prompt"]) for r in records] == [(item.id, item.prompt) for item in asked]
    assert all(record["missing_seg"] and record["intersection"] == 0 and record["union"] > 0 for record in records)


def test_depth_command(evaluate, checkpoint, val_shards):
    done = evaluate("depth", "--checkpoint", str(checkpoint), "--shards", str(val_shards), "--limit", "1",
                    "--max-new-tokens", "4", "--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert results["data"]["images"] == 1
    assert 0.0 <= results["scores"]["token_accuracy"] <= 1.0 and results["scores"]["samples"] == 1


def test_hardblink_decomposition_on_a_synthetic_world(evaluate, checkpoint, synth_world, tmp_path, monkeypatch):
    from perceptio.evaluate.decomposition import TokenReader
    from perceptio.evaluate.hardblink import load_hardblink
    from perceptio.tokenize import DepthVQVAE

    from perceptio.evaluate.synth_blink import SynthBlinkConfig, build_questions

    build_questions(synth_world, tmp_path / "blink", SynthBlinkConfig(seed=3, questions_per_image=1, variants=(3,)))
    given: list = []
    original = Predictor.predict_batch
    monkeypatch.setattr(Predictor, "predict_batch", lambda self, images, prompts, answer_prefixes=None:
                        given.append(answer_prefixes) or original(self, images, prompts, answer_prefixes))
    done = evaluate("hardblink", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "blink"), "--variants", "3",
                    "--limit", "2", "--answer", "depth", "--world", str(synth_world), "--max-new-tokens", "4", "--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    replies = results["replies"]
    assert len(replies) == 2
    # (a) is read from the world's true tokens; (d) is the letter written after them, for every question.
    assert all(reply["truth_choice"] in ("A", "B", "C") and "truth_fed_choice" in reply for reply in replies)
    decomposition = results["scores"]["decomposition"]
    assert decomposition["truth_fed_choice"] == np.mean([reply["truth_fed_choice"] == reply["answer"] for reply in replies])
    # The (d) pass began each answer with that question's true span: its image's true codes.
    reader = TokenReader(DepthVQVAE.from_pretrained(checkpoint / "depth_tokenizer"), synth_world)
    questions = load_hardblink(tmp_path / "blink", (3,))[:2]
    fed = [prefix for call in given if call is not None for prefix in call]
    assert fed == [reader.truth_span(question.row) for question in questions]
    assert all(prefix.count("[D_") == 102 for prefix in fed)  # [D_START], 100 codes, [D_END]


def test_hardblink_command_on_the_real_samples(evaluate, checkpoint, shared_data):
    done = evaluate("hardblink", "--checkpoint", str(checkpoint), "--data", str(shared_data / "hardblink"),
                    "--variants", "3,5", "--limit", "2", "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert "average" in done.stdout and "hardblink" in done.stdout


def test_predict_command_writes_a_picture(evaluate, checkpoint, tmp_path):
    source = tmp_path / "in.png"
    image(80, 60).save(source)
    out = tmp_path / "pred.png"
    done = evaluate("predict", "--checkpoint", str(checkpoint), "--image", str(source), "--prompt", "segment the cube",
                    "--out", str(out), "--max-new-tokens", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["picture"] == str(out)
    with Image.open(out) as picture:
        assert picture.width > 2 * 80 and picture.height > 60


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["predict", "--checkpoint", "{ckpt}", "--image", "/nonexistent.png", "--prompt", "x", "--out", "o.png"], "image not found"),
        (["hardblink", "--checkpoint", "{ckpt}", "--data", "/nonexistent"], "HardBLINK folder not found"),
        (["refseg", "--checkpoint", "/nonexistent", "--shards", "{shards}"], "checkpoint folder not found"),
        (["refseg", "--checkpoint", "{ckpt}", "--shards", "{shards}", "--split", "testB"], "no shards"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(evaluate, checkpoint, val_shards, arguments, message):
    filled = [a.format(ckpt=checkpoint, shards=val_shards) for a in arguments]
    done = evaluate(*filled)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("forced", [False, True], ids=["free", "seg-then-depth"])
def test_batched_generation_equals_one_by_one_token_for_token(predictor, monkeypatch, forced):
    model = predictor.model
    if forced:  # every row writes [SEG] and a span, so masks and depth are compared too
        original = predictor._processor
        monkeypatch.setattr(predictor, "_processor",
                            lambda width, starts: ChoosesSegThenDepth(original(width, starts), width, model.seg_token_id))
    # The new token rows (peft's trainable tokens) start small (transformers' mean resizing draws
    # them like the std-0.02 old rows), so the random model's depth-code logits lie close together
    # and float noise from padding can flip a greedy choice (it did, at the 40th code). Rows of unit
    # scale make every choice clear; the comparison stays exact.
    rows = model.adapter.model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    monkeypatch.setattr(rows, "data", torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)))
    rng = np.random.default_rng(3)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((64, 48), (40, 72), (96, 32))]
    prompts = ["Please segment the red cube.", "Which point is closest to the camera? (A) (B) (C) (D)",
               "Please segment the object described as \"the small green sphere on the far left\"."]
    single = [predictor.predict(picture, prompt) for picture, prompt in zip(pictures, prompts)]
    batched = predictor.predict_batch(pictures, prompts)
    assert len({len(model.processor.token_ids(model.processor.prompt_text(p, 1))) for p in prompts}) == 3  # padding used
    for one, many in zip(single, batched):
        assert many.token_ids == one.token_ids
        assert many.text == one.text and many.well_formed == one.well_formed and many.depth_codes == one.depth_codes
        if forced:
            assert many.mask is not None and many.mask.shape == one.mask.shape
            assert (many.mask != one.mask).mean() < 1e-3  # one forward for all rows: float noise at most
            np.testing.assert_allclose(many.depth, one.depth, atol=1e-5)


def test_batch_size_changes_nothing_but_speed_and_progress_is_a_plain_line(evaluate, checkpoint, val_shards):
    runs = {}
    for batch_size in ("1", "3"):
        done = evaluate("depth", "--checkpoint", str(checkpoint), "--shards", str(val_shards), "--max-new-tokens", "4",
                        "--batch-size", batch_size, "--dtype", "float32", "--json")
        assert done.returncode == 0, done.stderr
        runs[batch_size] = json.loads(done.stdout)
        # stderr is not a terminal here: the progress is one plain line at the end, no bar.
        assert "depth val: 2/2 samples (100%)" in done.stderr and "\x1b[" not in done.stderr
    assert runs["1"]["scores"] == runs["3"]["scores"]


def test_conversation_command_scores_every_answer_after_its_history(evaluate, checkpoint, tmp_path):
    from perceptio.curate.conversations import LLAVA, ConversationRequest, curate_conversations

    images = tmp_path / "images"
    for name in ("coco/train2017/000000033471.jpg", "gqa/images/2354786.jpg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        image().save(images / name, format="JPEG")
    shards = tmp_path / "llava"
    sample_file = Path(__file__).parent / "data/llava/llava_v1_5_mix665k_sample.json"
    curate_conversations(ConversationRequest(LLAVA, sample_file, images, shards, split="val", progress=False))
    done = evaluate("conversation", "--checkpoint", str(checkpoint), "--shards", str(shards), "--max-new-tokens", "3",
                    "--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    # Three conversations kept by curation: the bus (two answers), the text-only one and the GQA one.
    assert results["scores"]["answers"] == 4 and results["scores"]["conversations"] == 3
    first, second = results["examples"][:2]
    assert (first["turn"], second["turn"]) == (1, 3) and first["key"] == second["key"]
    assert second["reference"] == "An advertisement for a local bakery."
    assert all(record["exact_match"] == (record["prediction"].lower() == record["reference"].lower())
               for record in results["examples"])
