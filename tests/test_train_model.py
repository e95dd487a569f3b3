"""PerceptioModel on the built-in tiny InternVL + SAM2: inputs, losses, gradients, ablations, export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from perceptio.errors import PerceptioError
from perceptio.tokens import D_START, SEG, depth_span
from perceptio.train.config import PerceptioConfig
from perceptio.train.model import TERMS, PerceptioModel, init_new_token_rows
from perceptio.train.processor import IMAGENET_MEAN, IMAGENET_STD, PerceptioProcessor

PROMPT = "Segment the red box and describe it."
DESCRIPTION = "a red box on the left"


def build(vqvae_dir, **changes) -> PerceptioModel:
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
    config = PerceptioConfig(model="tiny", tokenizer=str(vqvae_dir), lora_rank=8, lora_alpha=16, lora_dropout=0.0)
    return PerceptioModel.from_config(dataclasses.replace(config, **changes))


@pytest.fixture(scope="module")
def model(vqvae_dir):
    return build(vqvae_dir)


def picture(width: int = 120, height: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def example_parts(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.zeros((80, 120), dtype=np.uint8)
    mask[10:50, 20:70] = 1
    return {
        "image": picture(seed=seed),
        "prompt": PROMPT,
        "target": f"{SEG} {depth_span(rng.integers(0, 128, 100))} {DESCRIPTION}",
        "mask": mask,
        "depth": rng.uniform(-1, 1, (320, 320)).astype(np.float32),
    }


def mixed_batch(model: PerceptioModel) -> dict:
    """A grounding example (mask, depth, full span) and a question answered directly (no span, no mask)."""
    grounding = model.processor.encode_example(**example_parts())
    question = model.processor.encode_example(picture(seed=1), "Which point is closest to the camera?", "(B)", None, None)
    return model.processor.collate([grounding, question])


def weighted_total(config: PerceptioConfig, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    total = terms["llm"] + config.seg_bce * terms["seg_bce"] + config.seg_dice * terms["seg_dice"]
    total = total + config.seg_text * terms["seg_text"]
    if config.use_depth_loss:
        depth = config.lambda_m * terms["depth_marker"] + config.lambda_t * terms["depth_token"]
        total = total + config.lambda_d * (depth + config.lambda_c * terms["depth_count"])
    if config.use_depth_recon:
        total = total + config.lambda_r * terms["depth_recon"]
    return total + config.eye_depth * terms["eye_depth"]


def test_seg_text_reads_the_request_only_when_weighted(model, vqvae_dir, tmp_path):
    assert model.seg_reader is None  # the paper's objective by default
    with torch.no_grad():
        assert model(mixed_batch(model)).terms["seg_text"].item() == 0.0
    weighted = build(vqvae_dir, seg_text=0.5)
    asking = [model.processor.encode_example(**{**example_parts(seed), "prompt": prompt})
              for seed, prompt in enumerate(("Segment the red box.", "Segment the blue ball on the left."))]
    batch = weighted.processor.collate(asking)
    output = weighted(batch)
    # two different requests: the term is the contrast of two, near log 2 for an untrained reader
    assert 0.0 < output.terms["seg_text"].item() < 5.0
    assert output.loss.item() == pytest.approx(weighted_total(weighted.config, output.terms).item(), rel=1e-5)
    output.loss.backward()
    assert weighted.seg_reader.weight.grad.abs().sum() > 0
    lora = [param for name, param in weighted.named_parameters() if "lora_B" in name]  # the term reached the LM
    assert sum(float(param.grad.abs().sum()) for param in lora if param.grad is not None) > 0
    reloaded = PerceptioModel.from_pretrained(weighted.save_pretrained(tmp_path / "export"))
    assert torch.equal(reloaded.seg_reader.weight, weighted.seg_reader.weight)


def test_prompt_layout_is_internvl_processors(model):
    example = model.processor.encode_example(**example_parts())
    tokenizer = model.tokenizer
    prompt_length = int((example["labels"] == -100).sum())
    expected_prompt = (
        "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 + "</img>\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(example["input_ids"][:prompt_length]) == expected_prompt
    assert torch.equal(example["labels"][prompt_length:], example["input_ids"][prompt_length:])
    target_ids = example["input_ids"][prompt_length:].tolist()
    assert target_ids[0] == model.seg_token_id and target_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(token in set(model.depth_token_ids.tolist()) for token in target_ids) == 100
    assert tokenizer.decode(target_ids).endswith(DESCRIPTION + "<|im_end|>")


def test_image_tensors_match_a_manual_preprocessing(model):
    image = picture()
    example = model.processor.encode_example(image, PROMPT, DESCRIPTION, None, None)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    tile = (np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC), dtype=np.float64) / 255 - mean) / std
    assert example["pixel_values"].shape == (1, 3, 448, 448)
    # Bicubic filters may round differently by a grey level between PIL code paths.
    assert np.abs(example["pixel_values"][0].numpy().transpose(1, 2, 0) - tile).max() < 2 / 255 / min(IMAGENET_STD)
    side = model.segmenter.image_size
    sam = (np.asarray(image.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64) / 255 - mean) / std
    assert np.allclose(example["sam_pixel_values"].numpy().transpose(1, 2, 0), sam, atol=1e-5)
    assert example["gt_masks"].shape == (0, side // 4, side // 4) and example["num_masks"] == 0


def test_tiling_is_an_option(model):
    tiled = PerceptioProcessor(model.tokenizer, dataclasses.replace(model.processor.settings, crop_to_patches=True))
    tiles = tiled.pixel_values(picture(width=896, height=448))
    assert tiles.shape == (3, 3, 448, 448)  # a 2x1 grid plus InternVL's thumbnail
    assert tiled.prompt_text("hi", num_tiles=3).count("<IMG_CONTEXT>") == 3 * 256
    assert model.processor.pixel_values(picture(width=896, height=448)).shape == (1, 3, 448, 448)


def test_loss_is_the_weighted_sum_of_every_term(model):
    model.eval()
    output = model(mixed_batch(model))
    assert set(output.terms) == set(TERMS)
    assert all(value.item() > 0 for name, value in output.terms.items() if name not in ("seg_text", "eye_depth"))  # off
    assert torch.allclose(output.loss, weighted_total(model.config, output.terms))


def test_llm_term_equals_transformers_own_loss(model):
    """The restricted-logits path against the base model's full-logits loss on the same batch."""
    model.eval()
    batch = mixed_batch(model)
    with torch.no_grad():
        reference = model.vlm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
        ).loss
        ours = model(batch).terms["llm"]
    assert torch.allclose(ours, reference, atol=1e-6)


def llm_term_and_logits(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's L_LLM on the mixed batch, the batch's full logits and its labels."""
    batch = mixed_batch(model)
    with torch.no_grad():
        logits = model.vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
        return model(batch).terms["llm"], logits, batch["labels"]


def test_span_weight_zero_leaves_the_depth_span_out_of_the_llm_term(vqvae_dir):
    model = build(vqvae_dir, span_weight=0.0).eval()
    ours, logits, labels = llm_term_and_logits(model)
    kept = []
    for row, row_labels in enumerate(labels.tolist()):
        start = row_labels.index(model.d_start_id) if model.d_start_id in row_labels else len(row_labels)
        end = row_labels.index(model.d_end_id, start) if start < len(row_labels) else -1
        for position, label in enumerate(row_labels):
            if label != -100 and position > 0 and not start <= position <= end:
                kept.append(torch.nn.functional.cross_entropy(logits[row, position - 1].float(), torch.tensor(label)))
    assert len(kept) < int((labels != -100).sum()) - 100, "the grounding example's span is left out"
    assert torch.allclose(ours, torch.stack(kept).mean(), atol=1e-6)


def test_answer_weight_weighs_the_tokens_after_the_span_in_the_llm_term(vqvae_dir):
    model = build(vqvae_dir, answer_weight=3.0).eval()
    ours, logits, labels = llm_term_and_logits(model)
    codes = set(model.depth_token_ids.tolist())
    weighted, weight, answers = torch.tensor(0.0), 0.0, 0
    for row, row_labels in enumerate(labels.tolist()):
        start = row_labels.index(model.d_start_id) if model.d_start_id in row_labels else None
        end = row_labels.index(model.d_end_id, start) if start is not None and model.d_end_id in row_labels[start:] else None
        last = max([end, *(t for t, y in enumerate(row_labels) if y in codes and t > end)]) if end is not None else None
        for position, label in enumerate(row_labels):
            if label != -100 and position > 0:
                w = 3.0 if last is not None and position > last else 1.0
                answers += w == 3.0
                nll = torch.nn.functional.cross_entropy(logits[row, position - 1].float(), torch.tensor(label))
                weighted, weight = weighted + w * nll, weight + w
    assert answers > 0, "the batch has an answer after a span"
    assert torch.allclose(ours, weighted / weight, atol=1e-6)


def test_gradients_reach_exactly_the_trainable_parts(model):
    model.train()
    model.zero_grad()
    model(mixed_batch(model)).loss.backward()
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert [name for name, param in trainable.items() if param.grad is None] == []  # DDP needs every one
    assert any("lora_B" in name and param.grad.abs().sum() > 0 for name, param in trainable.items())
    assert any("trainable_tokens_delta" in name and param.grad.abs().sum() > 0 for name, param in trainable.items())
    for part in ("segmenter.projector", "segmenter.sam.mask_decoder"):
        assert any(name.startswith(part) and param.grad.abs().sum() > 0 for name, param in trainable.items()), part
    frozen_parts = ("vision_tower", "multi_modal_projector", "segmenter.sam.vision_encoder", "depth_vqvae", "base_layer")
    assert not any(part in name for name in trainable for part in frozen_parts)
    state = model.trainable_state_dict()
    assert set(state) == set(trainable)
    model.zero_grad()


def test_a_few_steps_lower_the_loss_and_train_only_the_new_rows(vqvae_dir):
    model = build(vqvae_dir)
    batch = mixed_batch(model)
    embeddings = model.adapter.model.get_input_embeddings()
    before = embeddings.weight.detach().clone()  # the effective matrix: base rows + trained new rows
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)
    first = None
    for _ in range(3):
        loss = model(batch).loss
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(batch).loss.item() < first
    after = embeddings.weight.detach()
    new_rows = torch.zeros(len(after), dtype=torch.bool)
    new_rows[model.seg_token_id :] = True  # [SEG] is the first token added
    assert torch.equal(after[~new_rows], before[~new_rows])
    assert not torch.equal(after[model.seg_token_id], before[model.seg_token_id])


@pytest.mark.parametrize("tied", [True, False])
def test_new_token_rows_start_as_distinct_as_the_old_rows_or_all_at_their_mean(tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    language_model = Qwen2ForCausalLM(Qwen2Config(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    inputs, outputs = language_model.get_input_embeddings().weight, language_model.get_output_embeddings().weight
    old_inputs, old_outputs = inputs[:400].detach().clone(), outputs[:400].detach().clone()
    init_new_token_rows(language_model, range(400, 600), "spread")
    new = inputs[400:].detach()
    assert torch.equal(inputs[:400], old_inputs) and torch.equal(outputs[:400], old_outputs)
    # Each dimension spreads over the new rows as over the old ones, around the old rows' mean.
    assert 0.8 < (new.std(0) / old_inputs.std(0)).mean() < 1.2
    assert (new.mean(0) - old_inputs.mean(0)).abs().max() < 4 * old_inputs.std(0).max() / 200 ** 0.5
    if not tied:  # untied output rows start at the mean: the new tokens' first logits are ordinary ones
        assert torch.allclose(outputs[400:], old_outputs.mean(0).expand(200, -1), atol=1e-6)
    init_new_token_rows(language_model, range(400, 600), "mean")
    assert torch.allclose(inputs[400:], old_inputs.mean(0).expand(200, -1), atol=1e-6)


def test_the_model_starts_its_depth_codes_at_one_vector_or_apart_when_told_spread(vqvae_dir):
    def code_rows(model: PerceptioModel) -> torch.Tensor:
        return model.adapter.model.get_input_embeddings().weight[model.depth_token_ids].detach()

    same = code_rows(build(vqvae_dir, train_language_model=True))
    assert PerceptioConfig().new_token_init == "mean" and torch.cdist(same, same).max() < 1e-5
    spread = code_rows(build(vqvae_dir, train_language_model=True, new_token_init="spread"))
    assert torch.cdist(spread, spread).add(torch.eye(len(spread)) * 1e9).min() > 1e-2  # no two codes alike
    with pytest.raises(PerceptioError, match="new-token-init"):
        PerceptioConfig(new_token_init="zeros")


@pytest.mark.parametrize("switch", ["use_depth_tokens", "use_segmentation"])
def test_ablations_that_change_the_targets(vqvae_dir, switch):
    model = build(vqvae_dir, **{switch: False})
    model.eval()
    batch = mixed_batch(model)
    output = model(batch)
    ids = batch["input_ids"]
    if switch == "use_depth_tokens":
        assert not (ids == model.d_start_id).any() and not torch.isin(ids, model.depth_token_ids).any()
        assert (ids == model.seg_token_id).any()
        assert all(output.terms[name].item() == 0 for name in TERMS if name.startswith("depth"))
    else:
        assert model.segmenter is None and "sam_pixel_values" not in batch
        assert not (ids == model.seg_token_id).any() and (ids == model.d_start_id).any()
        assert output.terms["seg_bce"].item() == 0 and output.terms["seg_dice"].item() == 0
    assert torch.allclose(output.loss, weighted_total(model.config, output.terms))


@pytest.mark.parametrize("switch", ["use_depth_loss", "use_depth_recon"])
def test_ablations_that_drop_a_loss(model, switch):
    """The term is still measured (for the tables) but no longer part of the trained loss."""
    model.eval()
    batch = mixed_batch(model)
    full = model(batch)
    original = model.config
    model.config = dataclasses.replace(original, **{switch: False})
    try:
        ablated = model(batch)
    finally:
        model.config = original
    dropped = ["depth_recon"] if switch == "use_depth_recon" else ["depth_marker", "depth_token", "depth_count"]
    weights = {"depth_recon": original.lambda_r}
    weights.update(
        depth_marker=original.lambda_d * original.lambda_m,
        depth_token=original.lambda_d * original.lambda_t,
        depth_count=original.lambda_d * original.lambda_c,
    )
    assert all(torch.equal(ablated.terms[name], full.terms[name]) for name in TERMS)
    removed = sum(weights[name] * full.terms[name] for name in dropped)
    assert torch.allclose(ablated.loss, full.loss - removed, atol=1e-5)


def test_ablated_targets_are_rewritten_cleanly(vqvae_dir):
    model = build(vqvae_dir, use_depth_tokens=False, use_segmentation=False)
    assert model.processor.ablated_target(f"{SEG} {D_START}[D_001][D_002][D_END] a red box") == "a red box"
    assert model.processor.ablated_target(f"{D_START}[D_001] truncated") == ""  # a span without its end runs to the end
    assert model.processor.ablated_target("(B)") == "(B)"


def test_batch_without_masks_keeps_the_segmenter_in_the_graph(model):
    model.train()
    model.zero_grad()
    question = model.processor.encode_example(picture(seed=1), "Which point is closest?", "(B)", None, None)
    output = model(model.processor.collate([question]))
    output.loss.backward()
    decoder = [param for name, param in model.named_parameters() if name.startswith("segmenter.") and param.requires_grad]
    assert all(param.grad is not None and param.grad.abs().sum() == 0 for param in decoder)
    assert output.terms["seg_bce"].item() == 0
    model.zero_grad()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(vqvae_dir):
    plain, checkpointed = build(vqvae_dir), build(vqvae_dir, gradient_checkpointing=True)
    results = []
    for model in (plain, checkpointed):
        model.train()
        loss = model(mixed_batch(model)).loss
        loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
        results.append((loss.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0])
    assert all(torch.allclose(results[0][1][name], results[1][1][name], atol=1e-6) for name in results[0][1])


def test_collate_pads_right_and_keeps_lists(model):
    first = model.processor.encode_example(**example_parts())
    second = model.processor.encode_example(picture(seed=1), "Which point is closest?", "(B)", None, None)
    first["key"], second["key"] = "a", "b"
    batch = model.processor.collate([first, second])
    length = len(first["input_ids"])
    assert batch["input_ids"].shape == (2, length) and batch["key"] == ["a", "b"]
    short = len(second["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (length - short)
    assert (batch["labels"][1, short:] == -100).all()
    assert batch["pixel_values"].shape == (2, 3, 448, 448)


def test_export_adapter_and_merged_reload_to_the_same_losses(vqvae_dir, tmp_path):
    model = build(vqvae_dir)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # as if trained: LoRA's B starts at zero, which would make merging a no-op
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    batch = mixed_batch(model)
    model.eval()
    with torch.no_grad():
        expected = model(batch).terms

    for merged in (False, True):
        folder = model.save_pretrained(tmp_path / "export", merged=merged)  # the second call replaces the first
        reloaded = PerceptioModel.from_pretrained(folder).eval()
        assert reloaded.is_tiny
        with torch.no_grad():
            terms = reloaded(batch).terms
        for name in TERMS:
            assert torch.allclose(terms[name], expected[name], atol=1e-4), (merged, name)
    assert not list(tmp_path.glob(".export*"))  # no staging folder left behind

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    vlm = AutoModelForImageTextToText.from_pretrained(tmp_path / "export" / "vlm")
    assert vlm.config.perceptio_tiny
    assert AutoTokenizer.from_pretrained(tmp_path / "export" / "vlm").convert_tokens_to_ids(SEG) == model.seg_token_id


def test_adapter_export_is_a_peft_folder_and_the_heads_load_on_their_own(vqvae_dir, tmp_path):
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    from perceptio.tokens import special_tokens
    from perceptio.train.sam import SamSegmenter
    from perceptio.train.tiny import tiny_internvl, tiny_sam2, tiny_text_tokenizer

    model = build(vqvae_dir)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # as if trained (LoRA's B starts at zero)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    folder = model.save_pretrained(tmp_path / "export")
    for name in ("adapter_config.json", "adapter_model.safetensors", "heads.safetensors", "heads_config.json", "trainable.safetensors"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"

    # The ecosystem's way: the base model with the new tokens, then PeftModel.from_pretrained(base, folder).
    tokenizer = tiny_text_tokenizer()
    base = tiny_internvl(tokenizer)  # the same seeded random weights the model was built on
    tokenizer.add_tokens(special_tokens(model.depth_vqvae.config.num_codes), special_tokens=True)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    ids = tokenizer(f"{PROMPT} {SEG} {depth_span(np.arange(100) % 128)}", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        ours = model.vlm(input_ids=ids).logits
    assert torch.allclose(theirs, ours, atol=1e-4)

    # The heads: a fresh SAM2 segmenter takes heads.safetensors and equals the trained one.
    heads_config = json.loads((folder / "heads_config.json").read_text())
    segmenter = SamSegmenter(tiny_sam2(), heads_config["text_hidden_size"])
    missing, unexpected = segmenter.load_state_dict(load_file(folder / "heads.safetensors"), strict=False)
    assert not unexpected and sorted(heads_config["tensors"]) == sorted(load_file(folder / "heads.safetensors"))
    trained = {name: param for name, param in model.segmenter.named_parameters() if param.requires_grad}
    for name, param in segmenter.named_parameters():
        if name in trained:
            assert torch.equal(param, trained[name]), name


def test_bad_inputs_are_one_line_errors(vqvae_dir, tmp_path):
    with pytest.raises(PerceptioError, match="does not exist"):
        build(tmp_path / "missing")
    with pytest.raises(PerceptioError, match="not a perceptio model folder"):
        PerceptioModel.from_pretrained(tmp_path)
    with pytest.raises(PerceptioError, match="depth tokenizer"):
        PerceptioModel.from_config(PerceptioConfig(model="tiny"))
    with pytest.raises(PerceptioError, match="unknown PerceptioConfig fields"):
        PerceptioConfig.from_dict({"lora_rnak": 3})


def test_untied_output_rows_train_and_merge(vqvae_dir, tmp_path, monkeypatch):
    """Larger InternVLs (e.g. InternVL3-8B) do not tie lm_head to the embeddings: both sets of new rows train."""
    import perceptio.train.tiny as tiny

    tied_builder = tiny.tiny_internvl

    def untied(tokenizer, vocab_size=None):
        model = tied_builder(tokenizer, vocab_size)
        model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        return model

    monkeypatch.setattr(tiny, "tiny_internvl", untied)
    model = build(vqvae_dir, use_segmentation=False)
    batch = mixed_batch(model)
    model(batch).loss.backward()
    deltas = {name: param for name, param in model.named_parameters() if "trainable_tokens_delta" in name}
    assert {"embed_tokens" in name for name in deltas} == {True, False}  # one for the input, one for lm_head
    assert all(param.grad.abs().sum() > 0 for param in deltas.values())
    with torch.no_grad():
        for param in deltas.values():
            param.add_(torch.randn_like(param) * 0.05)
        expected = model.eval()(batch).terms
        reloaded = PerceptioModel.from_pretrained(model.save_pretrained(tmp_path / "merged", merged=True)).eval()
        assert torch.allclose(reloaded(batch).terms["llm"], expected["llm"], atol=1e-5)


def test_full_fine_tuning_overfits_one_example_so_greedy_decoding_writes_its_span(vqvae_dir, tmp_path):
    """The TINY model trained fully must reproduce a training target under plain greedy decoding.

    Guards the whole path from training to generation (prompt layout, image inputs, the new tokens'
    rows, the output head): a mismatch anywhere, or a model too constrained to learn (LoRA on the
    frozen random TINY model echoes its input token), leaves the span malformed.
    """
    model = build(vqvae_dir, train_language_model=True, use_segmentation=False, use_depth_recon=False)
    language_model = model.adapter.language_model()
    assert all(param.requires_grad for param in language_model.parameters())
    assert not any("lora" in name for name, _ in model.named_parameters())
    parts = example_parts()
    # Distinct codes: each is followed by one token, so the span is learnable in a few steps.
    parts["target"] = f"{SEG}{depth_span(np.random.default_rng(0).permutation(128)[:100])} {DESCRIPTION}"
    example = model.processor.encode_example(**parts)
    batch = model.processor.collate([example])
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)
    for _ in range(200):  # at 120 steps one code in 100 still came out wrong on two threads (not on one)
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    target = example["labels"][example["labels"] != -100].tolist()
    prompt = example["input_ids"][: len(example["input_ids"]) - len(target)][None]

    def greedy(trained: PerceptioModel) -> list[int]:
        with torch.inference_mode():
            output = trained.eval().adapter.model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=example["pixel_values"],
                max_new_tokens=len(target) + 8, do_sample=False, pad_token_id=trained.tokenizer.pad_token_id,
                eos_token_id=trained.tokenizer.convert_tokens_to_ids(trained.processor.end_of_turn()))
        return output[0, prompt.shape[1]:].tolist()

    assert greedy(model) == target
    reloaded = PerceptioModel.from_pretrained(model.save_pretrained(tmp_path / "export"))
    assert reloaded.config.train_language_model and greedy(reloaded) == target


def test_the_base_models_hub_commit_is_recorded_and_used(vqvae_dir, tmp_path, monkeypatch):
    """A hub id resolves to a commit of the standard cache; the config records it for the export."""
    import huggingface_hub

    from perceptio.train.model import _load_vlm
    from perceptio.train.tiny import tiny_internvl, tiny_text_tokenizer
    from tests.test_hub import fake_hub_cache

    saved = tmp_path / "saved"
    tokenizer = tiny_text_tokenizer()
    tiny_internvl(tokenizer).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/tiny-vlm", {path.name: path.read_bytes() for path in saved.iterdir()}, commit=commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    config = PerceptioConfig(model="org/tiny-vlm")
    _load_vlm(config, torch.float32)
    assert config.model_revision == commit
    # An explicit revision is the one loaded: a commit the cache does not hold is an error, not another base.
    with pytest.raises(PerceptioError, match="cannot load the vision-language model"):
        _load_vlm(PerceptioConfig(model="org/tiny-vlm", model_revision="0" * 40), torch.float32)
