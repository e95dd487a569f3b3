"""Constrained decoding: spans are always well formed, from random logits and a random model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from perceptio.evaluate.decoding import PerceptionFormatProcessor
from perceptio.evaluate.metrics import PerceptionVocabulary, depth_span
from perceptio.tokens import special_tokens

BASE_VOCAB = 32


def vocabulary(num_depth_tokens: int) -> PerceptionVocabulary:
    # Ids as a tokenizer assigns them when the perception tokens are appended to a base vocabulary.
    ids = {token: BASE_VOCAB + index for index, token in enumerate(special_tokens())}
    return PerceptionVocabulary(
        depth_token_ids=tuple(ids[f"[D_{code:03d}]"] for code in range(128)),
        d_start_id=ids["[D_START]"],
        d_end_id=ids["[D_END]"],
        num_depth_tokens=num_depth_tokens,
    )


def processor_for(vocab: PerceptionVocabulary, **options) -> PerceptionFormatProcessor:
    return PerceptionFormatProcessor(
        vocab.depth_token_ids, vocab.d_start_id, vocab.d_end_id, vocab.num_depth_tokens, **options
    )


def assert_prefix_well_formed(sequence: list[int], vocab: PerceptionVocabulary, finished: bool) -> None:
    """Independent check: walk the sequence and count; a finished sequence has no open span."""
    depth = set(vocab.depth_token_ids)
    inside, count = False, 0
    for token in sequence:
        if inside:
            if count < vocab.num_depth_tokens:
                assert token in depth, f"non-depth token {token} after {count} depth tokens"
                count += 1
            else:
                assert token == vocab.d_end_id, f"{token} instead of [D_END] after {count} depth tokens"
                inside = False
        else:
            assert token not in depth and token != vocab.d_end_id, f"{token} outside a span"
            if token == vocab.d_start_id:
                inside, count = True, 0
    if finished:
        assert not inside, "a span was left open"


@pytest.mark.parametrize("num_depth_tokens", [1, 4, 100])
def test_random_logits_always_give_well_formed_spans(num_depth_tokens):
    vocab = vocabulary(num_depth_tokens)
    processor = processor_for(vocab, max_spans=None)
    vocab_size = BASE_VOCAB + len(special_tokens()) + 3  # a padded embedding table
    generator = torch.Generator().manual_seed(num_depth_tokens)
    sequences = torch.randint(0, BASE_VOCAB, (6, 3), generator=generator)  # the prompt
    for _ in range(3 * num_depth_tokens + 40):
        logits = torch.randn(sequences.shape[0], vocab_size, generator=generator) * 5
        # Push the model towards the markers so that spans open and close often.
        logits[:, vocab.d_start_id] += 4
        logits[:, vocab.d_end_id] += 8
        masked = processor(sequences, logits)
        probabilities = torch.softmax(masked, dim=-1)
        next_tokens = torch.multinomial(probabilities, 1, generator=generator)
        sequences = torch.cat([sequences, next_tokens], dim=1)
    spans = 0
    for row in sequences.tolist():
        assert_prefix_well_formed(row, vocab, finished=False)
        spans += row.count(vocab.d_start_id)
    assert spans >= 6, "the test should exercise spans"


def test_one_span_by_default_and_never_opened_past_max_length():
    vocab = vocabulary(4)
    prompt = torch.tensor([[1, vocab.d_start_id, *vocab.depth_token_ids[:4], vocab.d_end_id]])
    logits = torch.zeros(1, BASE_VOCAB + len(special_tokens()))
    assert processor_for(vocab)(prompt, logits)[0, vocab.d_start_id] == float("-inf")
    assert processor_for(vocab, max_spans=2)(prompt, logits)[0, vocab.d_start_id] == 0
    # Length 7 now; a span needs 6 more positions, so with max_length 12 it cannot be opened.
    assert processor_for(vocab, max_spans=None, max_length=12)(prompt, logits)[0, vocab.d_start_id] == float("-inf")
    assert processor_for(vocab, max_spans=None, max_length=13)(prompt, logits)[0, vocab.d_start_id] == 0


def test_spans_in_the_prompt_do_not_count():
    vocab = vocabulary(4)
    earlier_turn = [1, vocab.d_start_id, *vocab.depth_token_ids[:4], vocab.d_end_id, 2]
    logits = torch.zeros(1, BASE_VOCAB + len(special_tokens()))
    history = torch.tensor([earlier_turn])
    # Counted from the start, the earlier turn's span uses up the one span; counted from the
    # generated part (nothing yet), a new span may open.
    assert processor_for(vocab)(history, logits)[0, vocab.d_start_id] == float("-inf")
    assert processor_for(vocab, prompt_length=len(earlier_turn))(history, logits)[0, vocab.d_start_id] == 0
    # An open span in the generated part is still followed through to its end, and then closed.
    generated = torch.tensor([earlier_turn + [vocab.d_start_id, *vocab.depth_token_ids[:4]]])
    after = processor_for(vocab, prompt_length=len(earlier_turn))(generated, logits)
    assert torch.isfinite(after[0]).nonzero().flatten().tolist() == [vocab.d_end_id]
    done = torch.tensor([earlier_turn + [vocab.d_start_id, *vocab.depth_token_ids[:4], vocab.d_end_id]])
    assert processor_for(vocab, prompt_length=len(earlier_turn))(done, logits)[0, vocab.d_start_id] == float("-inf")


def test_readouts_may_write_depth_codes_only_after_a_closed_span():
    vocab = vocabulary(4)
    logits = torch.zeros(3, BASE_VOCAB + len(special_tokens()))
    depth = list(vocab.depth_token_ids)
    rows = torch.tensor([[1, 2, 3, 4, 5, 6, 7],  # nothing written yet
                         [1, vocab.d_start_id, *depth[:4], vocab.d_end_id],  # a closed span
                         [1, 2, vocab.d_start_id, *depth[:4]]])  # a full span, not yet closed
    for readouts in (False, True):
        allowed = torch.isfinite(processor_for(vocab, readouts=readouts)(rows, logits))
        assert not allowed[0, depth].any() and not allowed[0, vocab.d_end_id]
        assert bool(allowed[1, depth].all()) == readouts and not allowed[1, vocab.d_end_id]
        assert not allowed[1, vocab.d_start_id]  # still one span
        assert allowed[2].nonzero().flatten().tolist() == [vocab.d_end_id]


def test_markers_must_not_be_depth_tokens():
    with pytest.raises(ValueError):
        PerceptionFormatProcessor([5, 6], d_start_id=5, d_end_id=7, num_depth_tokens=2)


@pytest.mark.parametrize("sampling", [False, True])
def test_random_causal_lm_generates_well_formed_spans(sampling):
    vocab = vocabulary(100)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=BASE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.resize_token_embeddings(BASE_VOCAB + len(special_tokens()))  # the perception tokens added
    with torch.no_grad():
        # Make [D_START] likely so that a random model opens spans; the processor must close them.
        model.lm_head.weight[vocab.d_start_id] = model.lm_head.weight[vocab.d_start_id] * 0 + 0.5
        model.lm_head.bias = None
    prompt = torch.randint(3, BASE_VOCAB, (4, 5))
    processor = processor_for(vocab, max_length=5 + 150)
    output = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=150, do_sample=sampling,
        logits_processor=LogitsProcessorList([processor]), pad_token_id=2,
    )
    opened = 0
    for row in output[:, prompt.shape[1]:].tolist():
        assert_prefix_well_formed(row, vocab, finished=True)
        if vocab.d_start_id in row:
            opened += 1
            assert depth_span(row, vocab)[0]
    assert opened >= 1


def test_each_row_counts_its_answer_from_its_own_start():
    vocab = vocabulary(4)
    span = [vocab.d_start_id, *vocab.depth_token_ids[:4], vocab.d_end_id]
    rows = torch.tensor([[1, 2, *span], [1, 2, *span]])
    logits = torch.zeros(2, BASE_VOCAB + len(special_tokens()))
    # Row 0's answer began with the span (a caller's prefix), row 1's begins after it (history).
    after = processor_for(vocab, prompt_length=[2, len(span) + 2])(rows, logits)
    assert after[0, vocab.d_start_id] == float("-inf") and after[1, vocab.d_start_id] == 0
    with pytest.raises(ValueError, match="answer starts"):
        processor_for(vocab, prompt_length=[2])(rows, logits)
