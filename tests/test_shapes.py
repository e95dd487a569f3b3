"""The published architectures rebuilt from their configs (perceptio/train/shapes.py)."""

from __future__ import annotations

import pytest

from perceptio.errors import PerceptioError
from perceptio.train import shapes


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_parameter_count_matches_the_published_size(name):
    shape = shapes.SHAPES[name]
    model = shapes.build(shape, device="meta", whole_checkpoint=True)
    counted = shapes.count_parameters(model)
    assert abs(counted / shape.published_parameters - 1) < 0.01, (counted, shape.published_parameters)


def test_sam2_image_model_is_the_checkpoint_without_its_video_memory():
    shape = shapes.SHAPES["sam2.1-hiera-large"]
    image = shapes.count_parameters(shapes.build(shape, device="meta"))
    whole = shapes.count_parameters(shapes.build(shape, device="meta", whole_checkpoint=True))
    model = shapes.build(shape, device="meta")
    assert image < whole
    assert model.config.vision_config.backbone_config.blocks_per_stage == [2, 6, 36, 4]
    assert model.config.prompt_encoder_config.image_size == 1024


def test_internvl_shapes_have_untied_heads_and_the_published_image_token():
    for name in ("internvl3-1b", "internvl3-8b"):
        model = shapes.build(shapes.SHAPES[name], device="meta")
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert model.get_input_embeddings().weight.shape[0] == 151674
        assert model.config.image_token_id == 151667


def test_shaped_tokenizer_puts_the_special_tokens_at_their_published_ids():
    shape = shapes.SHAPES["internvl3-1b"]
    tokenizer = shapes.shaped_tokenizer(shape)
    ids = tokenizer.convert_tokens_to_ids
    assert ids("<|endoftext|>") == 151643 and ids("<|im_start|>") == 151644 and ids("<|im_end|>") == 151645
    assert ids(["<img>", "</img>", "<IMG_CONTEXT>"]) == [151665, 151666, 151667]
    assert tokenizer.context_image_token == "<IMG_CONTEXT>"
    # As the published tokenizer after InternVL's conversion adds <video>: one more than the rows,
    # so adding the perception tokens must grow the embedding.
    assert len(tokenizer) == 151675
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nthe red sphere<|im_end|>"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded[0] == 151644 and encoded[-1] == 151645
    assert encoded.count(151667) == 1 and max(encoded) < len(tokenizer)
    assert tokenizer.decode(encoded) == text


def test_unknown_shape_is_one_line_naming_the_known_ones():
    with pytest.raises(PerceptioError, match="shape:sam2.1-hiera-large"):
        shapes.shape_for("shape:sam3", "sam2")
    with pytest.raises(PerceptioError, match="unknown internvl shape"):
        shapes.shape_for("shape:sam2.1-hiera-tiny", "internvl")
