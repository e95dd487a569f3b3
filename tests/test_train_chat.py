"""Conversations laid out by the chat template: labels on every answer and nothing else."""

from __future__ import annotations

import pytest

from perceptio.errors import PerceptioError
from perceptio.train.chat import Turn, as_turns, lay_out
from perceptio.train.losses import IGNORE_INDEX
from perceptio.train.tiny import tiny_text_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_text_tokenizer()


def _render(tokenizer):
    return lambda messages, generation: tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation)


def _tokenize(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token  # labels are the input ids themselves (the loss shifts them)
            current.append(token)
    return runs + ([current] if current else [])


def test_three_turn_conversation_is_the_template_text_with_only_answers_labelled(tokenizer) -> None:
    turns = as_turns([("user", "What colour is the cube?"), ("assistant", "red"), ("user", "And the ball?"),
                      ("assistant", "blue"), ("user", "How many cones?"), ("assistant", "3")])
    image = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    ids, labels = lay_out(turns, _render(tokenizer), _tokenize(tokenizer), "<|im_end|>",
                          lambda text: text.replace("<IMG_CONTEXT>", image))
    assert len(ids) == len(labels)
    whole = tokenizer.apply_chat_template(
        [{"role": t.role, "content": [{"type": "image"}] * (i == 0) + [{"type": "text", "text": t.text}]}
         for i, t in enumerate(turns)], tokenize=False)
    assert tokenizer.decode(ids) == whole.replace("<IMG_CONTEXT>", image).removesuffix("\n")
    assert [tokenizer.decode(run) for run in _labelled_runs(ids, labels)] == ["red<|im_end|>", "blue<|im_end|>", "3<|im_end|>"]
    # The role header before each answer is context, not target.
    header = _tokenize(tokenizer)("<|im_start|>assistant\n")
    first_answer = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    assert ids[first_answer - len(header):first_answer] == header
    assert set(labels[first_answer - len(header):first_answer]) == {IGNORE_INDEX}


def test_text_only_conversation_has_no_image_markup(tokenizer) -> None:
    ids, labels = lay_out([Turn("user", "Say hi."), Turn("assistant", "hi")], _render(tokenizer), _tokenize(tokenizer),
                          "<|im_end|>")
    assert "<IMG_CONTEXT>" not in tokenizer.decode(ids)
    assert [tokenizer.decode(run) for run in _labelled_runs(ids, labels)] == ["hi<|im_end|>"]


def test_bad_turn_orders_and_rewriting_templates_are_refused(tokenizer) -> None:
    render, tokenize = _render(tokenizer), _tokenize(tokenizer)
    with pytest.raises(PerceptioError, match="expected 'user'"):
        lay_out([Turn("assistant", "hi"), Turn("user", "hello")], render, tokenize, "<|im_end|>")
    with pytest.raises(PerceptioError, match="ends with a question"):
        lay_out([Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c")], render, tokenize, "<|im_end|>")

    def forgetful(messages, generation):  # shows only the last turn, as templates that drop history do
        return render(messages[-1:], generation)

    turns = [Turn("user", "a"), Turn("assistant", "b"), Turn("user", "c"), Turn("assistant", "d")]
    with pytest.raises(PerceptioError, match="the chat template"):
        lay_out(turns, forgetful, tokenize, "<|im_end|>")
