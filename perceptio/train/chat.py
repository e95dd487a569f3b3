"""A conversation of any number of turns, laid out by the base model's chat template, with labels.

:func:`lay_out` renders the turns with the tokenizer's chat template and returns token ids and
labels: every assistant turn's text and its end-of-turn marker are labelled, everything else (chat
markup, the user turns, the image placeholders, the role header before each answer) is
:data:`IGNORE_INDEX`. Each answer is tokenised on its own, after the prefix that the template renders
with ``add_generation_prompt=True``, which is exactly what the model sees when it generates that
answer at inference time.

The template must render a conversation as a growing text (each prefix of the turns renders to a
prefix of the whole); a template that rewrites earlier turns (some drop the reasoning of earlier
answers) is refused with a :class:`PerceptioError` rather than trained on mismatched labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from perceptio.errors import PerceptioError
from perceptio.train.losses import IGNORE_INDEX

USER, ASSISTANT = "user", "assistant"


@dataclass(frozen=True)
class Turn:
    role: str  # USER or ASSISTANT
    text: str


def as_turns(raw: Sequence[Any]) -> list[Turn]:
    """Turns from ``Turn`` objects, ``{"role", "text"}`` dicts (the shard json) or ``(role, text)`` pairs."""
    turns = []
    for item in raw:
        if isinstance(item, Turn):
            turns.append(item)
        elif isinstance(item, dict):
            turns.append(Turn(str(item["role"]), str(item["text"])))
        else:
            role, text = item
            turns.append(Turn(str(role), str(text)))
    return turns


def check_turns(turns: Sequence[Turn]) -> None:
    """Turns alternate user, assistant, ... and end with an answer (the thing to learn)."""
    if not turns:
        raise PerceptioError("a conversation needs at least one user turn and one answer")
    for position, turn in enumerate(turns):
        expected = USER if position % 2 == 0 else ASSISTANT
        if turn.role != expected:
            raise PerceptioError(f"turn {position} is from {turn.role!r}, expected {expected!r} (turns alternate)")
    if turns[-1].role != ASSISTANT:
        raise PerceptioError("the conversation ends with a question: there is no answer to learn")


def messages_for(turns: Sequence[Turn], with_image: bool) -> list[dict[str, Any]]:
    """Chat-template messages; the image, when there is one, leads the first user turn."""
    messages = []
    for position, turn in enumerate(turns):
        content: list[dict[str, str]] = [{"type": "text", "text": turn.text}]
        if position == 0 and with_image:
            content.insert(0, {"type": "image"})
        messages.append({"role": turn.role, "content": content})
    return messages


def lay_out(
    turns: Sequence[Turn],
    render: Callable[[list[dict[str, Any]], bool], str],
    tokenize: Callable[[str], list[int]],
    end_of_turn: str,
    expand_image: Callable[[str], str] | None = None,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of the whole conversation (see the module docstring).

    ``render(messages, add_generation_prompt)`` applies the chat template; ``expand_image`` turns the
    template's single image placeholder into the model's image markup (None: a text-only example).
    """
    check_turns(turns)
    messages = messages_for(turns, expand_image is not None)
    ids: list[int] = []
    labels: list[int] = []
    covered = ""  # the rendered text that ids already hold
    for position in range(1, len(turns), 2):
        before = render(messages[:position], True)
        if not before.startswith(covered):
            raise PerceptioError("the chat template rewrites earlier turns; cannot label the answers one by one")
        context = before[len(covered):]
        if expand_image is not None and position == 1:
            context = expand_image(context)
        context_ids = tokenize(context)
        answer = turns[position].text + end_of_turn
        answer_ids = tokenize(answer)
        ids += context_ids + answer_ids
        labels += [IGNORE_INDEX] * len(context_ids) + answer_ids
        covered = before + answer
        if not render(messages[: position + 1], False).startswith(covered):
            raise PerceptioError(f"the chat template does not close an answer with {end_of_turn!r} right after its text")
    return ids, labels
