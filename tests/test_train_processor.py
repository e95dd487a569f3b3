"""PerceptioProcessor: what DataLoader workers receive holds no model, and an export reloads it exactly."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.errors import PerceptioError
from perceptio.tokens import SEG, depth_span, mark_readouts
from perceptio.train.config import PerceptioConfig, StreamConfig
from perceptio.train.data import ResumableLoader
from perceptio.train.model import PerceptioModel
from perceptio.train.chat import ASSISTANT, USER, Turn
from perceptio.train.losses import IGNORE_INDEX, find_depth_spans
from perceptio.train.processor import PROCESSOR_NAME, PerceptioProcessor, unlabelled_spans
from tests.train_factory import write_shards


@pytest.fixture(scope="module")
def model(vqvae_dir):
    torch.manual_seed(0)
    return PerceptioModel.from_config(PerceptioConfig(model="tiny", tokenizer=str(vqvae_dir), lora_rank=4, lora_alpha=8))


def examples() -> list[dict]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8))
    mask = np.zeros((80, 120), dtype=np.uint8)
    mask[10:50, 20:70] = 1
    depth = rng.uniform(-1, 1, (320, 320)).astype(np.float32)
    return [
        {"image": image, "prompt": "Segment the red box.", "target": f"{SEG} {depth_span(rng.integers(0, 128, 100))} a box",
         "mask": mask, "depth": depth},
        {"image": image, "prompt": "Which point is closest to the camera?", "target": "(B)", "mask": None, "depth": None},
    ]


class ModuleSpy(pickle.Pickler):
    """A pickler that records every ``nn.Module`` it is asked to pickle."""

    def __init__(self, file):
        super().__init__(file)
        self.modules: list[str] = []

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module):
            self.modules.append(type(obj).__name__)
        return NotImplemented


def pickled(value) -> tuple[int, list[str]]:
    buffer = io.BytesIO()
    spy = ModuleSpy(buffer)
    spy.dump(value)
    return len(buffer.getvalue()), spy.modules


def test_dataloader_workers_receive_the_processor_not_the_model(model, tmp_path):
    write_shards(tmp_path, "refcoco-unc", shards=1, images_per_shard=2)
    loader = ResumableLoader(StreamConfig([tmp_path]), model.processor, batch_size=2)
    # What a spawn or forkserver worker unpickles: the DataLoader's dataset.
    size, modules = pickled(loader._loader.dataset)
    model_size, model_modules = pickled(model)
    assert modules == [] and model_modules  # the spy does see a model's modules
    assert size * 20 < model_size, (size, model_size)
    batch = next(loader)  # and it still makes batches
    assert batch.inputs["input_ids"].shape[0] == 2


def test_a_loaded_processor_encodes_token_for_token_like_the_original(model, tmp_path):
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / PROCESSOR_NAME).stat().st_mode & 0o777 == 0o644  # readable by teammates
    loaded = PerceptioProcessor.from_pretrained(tmp_path / "export")
    assert loaded.settings == model.processor.settings
    for parts in examples():
        original, reloaded = model.processor.encode_example(**parts), loaded.encode_example(**parts)
        assert original.keys() == reloaded.keys()
        assert original["input_ids"].tolist() == reloaded["input_ids"].tolist()
        for name in original:
            assert torch.equal(original[name], reloaded[name]), name
    # The model reloaded from the same folder builds the same processor.
    assert PerceptioModel.from_pretrained(tmp_path / "export").processor.settings == model.processor.settings


def test_a_folder_without_a_processor_is_a_user_error(tmp_path):
    with pytest.raises(PerceptioError, match=PROCESSOR_NAME):
        PerceptioProcessor.from_pretrained(tmp_path)


def test_a_span_given_as_context_is_read_but_not_labelled(model):
    parts = examples()[0]
    span = depth_span(range(100))
    target = f"{span} (B)"
    labelled = model.processor.encode_example(parts["image"], "Which point is closest?", target, depth=parts["depth"])
    context = model.processor.encode_conversation(parts["image"], [Turn(USER, "Which point is closest?"), Turn(ASSISTANT, target)],
                                                  depth=parts["depth"], span_is_context=True)
    assert torch.equal(labelled["input_ids"], context["input_ids"])  # the model reads the same sequence
    differ = (labelled["labels"] != context["labels"]).nonzero().flatten().tolist()
    span_ids = set(model.processor.token_ids(span))
    assert len(differ) == 102 and {labelled["labels"][i].item() for i in differ} == span_ids  # markers and 100 codes
    assert (context["labels"][differ] == IGNORE_INDEX).all()
    assert model.processor.token_ids(" (B)")[-2] in context["labels"].tolist()  # the letter is still a target
    spans = find_depth_spans(context["labels"][None], model.d_start_id, model.d_end_id)
    assert not spans.valid.any()  # no span: no L_marker and no L_depth for it
    assert unlabelled_spans([1, 5, 2, 3, 6, 4, 5, 7, 6], 5, 6) == [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4,
                                                                   IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    # Mark readouts after the span (--mark-readouts) are the answer's, labelled whether or not the span is.
    readouts = mark_readouts(["A", "B"], [17, 52])
    with_readouts = model.processor.encode_conversation(parts["image"], [Turn(USER, "Which point is closest?"),
                                                                         Turn(ASSISTANT, f"{span}{readouts}(B)")],
                                                        depth=parts["depth"], span_is_context=True)
    labelled = [label for label in with_readouts["labels"].tolist() if label != IGNORE_INDEX]
    assert labelled[:4] == model.processor.token_ids(" A[D_017] B[D_052]")  # the span unlabelled, then the readouts
    assert [label for label in labelled if label in model.depth_token_ids.tolist()] == labelled[1:4:2]
    # A reading question asked in text alone (--reading-in-text): no picture, the span read the same way.
    in_text = model.processor.encode_conversation(None, [Turn(USER, "Points A 3 7, B 1 8. Which is closest?"),
                                                         Turn(ASSISTANT, f"{span}{readouts}(B)")],
                                                  depth=None, span_is_context=True)
    assert in_text["pixel_values"].shape[0] == 0
    assert [label for label in in_text["labels"].tolist() if label != IGNORE_INDEX] == labelled
