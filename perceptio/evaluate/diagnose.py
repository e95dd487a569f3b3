"""Where the learning chain of a checkpoint breaks: three teacher-forced probes (``perceptio-evaluate diagnose``).

A Perceptio model is a chain: image -> language model -> ``[SEG]`` hidden state -> projector ->
SAM2 mask decoder (and image -> language model -> depth span). Each probe cuts one link on purpose,
on the trainer's own batches (the examples and targets of :func:`perceptio.train.data.expand_sample`,
encoded and collated by the model's processor), and measures what changes:

1. **Image reliance.** The mean target-token NLL (L_LLM) with the true images and with each
   sample's image replaced by the picture of the next sample that shows another one (the same
   text; pictures are interleaved, so that is mostly the next sample of the batch). A model that reads the picture pays for the wrong one; and the same for the depth-span
   tokens, which only the image can tell.
2. **[SEG] spread.** Over every ``[SEG]`` state of the samples: ``||std over samples|| / ||mean||``
   and the mean pairwise cosine similarity. States that hardly differ carry no expression.
3. **Decoder prompt reliance.** SAM2's mask logits with each mask's own ``[SEG]`` state and with
   the states rolled by one within the batch: ``mean |difference| / std(logits)``, with the relative
   change of the projected prompt that caused it, and IoU / DICE of both against the ground truth.

Every number comes with a one-line reading against a stated threshold (the ``*_MIN`` constants).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from perceptio.train import losses
from perceptio.train.loop import to_device

if TYPE_CHECKING:
    from perceptio.train.data import Example
    from perceptio.train.model import PerceptioModel

# Below these the link counts as broken (the readings quote them).
IMAGE_GAP_MIN = 0.01  # nats per token that the wrong image must cost
SEG_SPREAD_MIN = 0.1  # ||std|| / ||mean|| of the [SEG] states over samples
SEG_COSINE_MAX = 0.95  # mean pairwise cosine of the [SEG] states
PROMPT_RELIANCE_MIN = 0.01  # mean |logit change| / logit std when the [SEG] states are rolled
IOU_GAIN_MIN = 0.01  # IoU with own prompts minus IoU with rolled ones


@dataclass
class Mean:
    """A running mean of many values (float64)."""

    total: float = 0.0
    count: int = 0
    squares: float = 0.0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        self.total += float(values.sum())
        self.squares += float((values * values).sum())
        self.count += values.numel()

    @property
    def value(self) -> Optional[float]:
        return self.total / self.count if self.count else None

    @property
    def std(self) -> Optional[float]:
        if not self.count:
            return None
        mean = self.total / self.count
        return math.sqrt(max(self.squares / self.count - mean * mean, 0.0))


@dataclass
class Probes:
    """What the three probes accumulate over the batches."""

    nll_true: Mean = field(default_factory=Mean)
    nll_rolled: Mean = field(default_factory=Mean)
    span_true: Mean = field(default_factory=Mean)
    span_rolled: Mean = field(default_factory=Mean)
    seg_states: list[torch.Tensor] = field(default_factory=list)  # (n, D) float32 on the CPU
    logits: Mean = field(default_factory=Mean)  # own-prompt mask logits
    logit_change: Mean = field(default_factory=Mean)  # |own - rolled|
    prompt_change: Mean = field(default_factory=Mean)  # ||p_own - p_rolled|| / ||p_own|| per mask
    iou_own: Mean = field(default_factory=Mean)
    iou_rolled: Mean = field(default_factory=Mean)
    dice_own: Mean = field(default_factory=Mean)
    dice_rolled: Mean = field(default_factory=Mean)
    examples: int = 0
    batches: int = 0


def interleave_by_image(examples: Sequence["Example"]) -> list["Example"]:
    """The examples dealt round-robin over their pictures (first appearance order), so that a batch
    mixes pictures: the refs and sentences of one image come one after another in a shard."""
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(picture_key(example), []).append(example)
    dealt: list[Example] = []
    queues = list(groups.values())
    while any(queues):
        for queue in queues:
            if queue:
                dealt.append(queue.pop(0))
    return dealt


def picture_key(example: "Example") -> str:
    """What tells two pictures apart: the image bytes (the questions of one photo share them)."""
    return hashlib.sha1(example.image_bytes or b"").hexdigest()


def image_partners(keys: Sequence[str]) -> Optional[list[int]]:
    """For each sample, the next one (cyclically) showing another picture; None when all show one."""
    count = len(keys)
    partners = [next((other for other in ((index + step) % count for step in range(1, count)) if keys[other] != key), None)
                for index, key in enumerate(keys)]
    return None if None in partners else partners


def span_token_nll(supervised: losses.SupervisedLogits, token_nll: torch.Tensor, labels: torch.Tensor,
                   d_start_id: int, d_end_id: int) -> torch.Tensor:
    """The NLL of every token inside the batch's valid depth spans (between [D_START] and [D_END])."""
    spans = losses.find_depth_spans(labels, d_start_id, d_end_id)
    rows = [supervised.index[b, int(spans.start[b]) + 1 : int(spans.end[b])]
            for b in torch.nonzero(spans.length > 0).flatten().tolist()]
    if not rows:
        return token_nll.new_zeros(0)
    return token_nll[losses.checked_rows(torch.cat(rows))]


def mask_agreement(logits: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask IoU and DICE (M,) of the masks ``logits > 0`` against binary ``truth``; an empty
    prediction of an empty truth scores 1."""
    predicted, target = logits > 0, truth > 0.5
    intersection = (predicted & target).flatten(1).sum(1).double()
    union = (predicted | target).flatten(1).sum(1).double()
    sizes = predicted.flatten(1).sum(1).double() + target.flatten(1).sum(1).double()
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    dice = torch.where(sizes > 0, 2 * intersection / sizes.clamp(min=1), torch.ones_like(sizes))
    return iou, dice


class Diagnoser:
    """Runs the probes batch by batch on one model (``autocast``: the precision context to run under)."""

    def __init__(self, model: "PerceptioModel", device: torch.device, autocast: Callable[[], Any]):
        self.model, self.device, self.autocast = model.eval(), device, autocast
        self.probes = Probes()

    @torch.inference_mode()
    def add_batch(self, examples: Sequence["Example"], others: Optional[Sequence["Example"]]) -> None:
        """Probe one batch; ``others``: per sample, the one whose picture it is shown instead (None: no
        image probe)."""
        model, processor, probes = self.model, self.model.processor, self.probes
        decoded = [example.decode() for example in examples]
        batch = to_device(processor.collate([processor.encode_conversation(**item) for item in decoded]), self.device)
        probes.examples += len(examples)
        probes.batches += 1
        with self.autocast():
            hidden = model.hidden_states(batch)
            self._token_nll(batch, hidden, probes.nll_true, probes.span_true)
            if others is not None:
                rolled = [{**item, "image": other.image()} for item, other in zip(decoded, others)]
                rolled_batch = to_device(processor.collate([processor.encode_conversation(**item) for item in rolled]),
                                         self.device)
                self._token_nll(rolled_batch, model.hidden_states(rolled_batch), probes.nll_rolled, probes.span_rolled)
            if model.segmenter is not None:
                self._segmentation(batch, hidden)

    def _token_nll(self, batch: dict[str, Any], hidden: torch.Tensor, every: Mean, span: Mean) -> None:
        model = self.model
        supervised = losses.SupervisedLogits.from_hidden(hidden, batch["labels"], model.adapter.output_head())
        nll = supervised.token_nll()
        every.add(nll)
        if model.config.use_depth_tokens:
            span.add(span_token_nll(supervised, nll, batch["labels"], model.d_start_id, model.d_end_id))

    def _segmentation(self, batch: dict[str, Any], hidden: torch.Tensor) -> None:
        model, probes = self.model, self.probes
        rows, positions, mask_index = losses.seg_pairs(batch["labels"], model.seg_token_id, batch["num_masks"])
        states = hidden[rows, positions]
        probes.seg_states.append(states.float().cpu())
        if len(rows) < 2:  # rolling one state onto itself changes nothing
            return
        rolled_states = states.roll(1, dims=0)
        own = model.mask_logits(batch, rows, states).float()
        rolled = model.mask_logits(batch, rows, rolled_states).float()
        truth = batch["gt_masks"][rows, mask_index]
        probes.logits.add(own)
        probes.logit_change.add((own - rolled).abs())
        projector = model.segmenter.projector
        prompt, rolled_prompt = projector(states).float(), projector(rolled_states).float()
        probes.prompt_change.add((prompt - rolled_prompt).norm(dim=-1) / prompt.norm(dim=-1).clamp(min=1e-12))
        for logits, iou_mean, dice_mean in ((own, probes.iou_own, probes.dice_own),
                                            (rolled, probes.iou_rolled, probes.dice_rolled)):
            iou, dice = mask_agreement(logits, truth)
            iou_mean.add(iou)
            dice_mean.add(dice)


def seg_spread(states: torch.Tensor) -> tuple[Optional[float], Optional[float]]:
    """(||std over samples|| / ||mean||, mean pairwise cosine similarity) of (N, D) states; None below 2."""
    if states.shape[0] < 2:
        return None, None
    states = states.double()
    mean_norm = float(states.mean(0).norm())
    spread = float(states.std(0, unbiased=False).norm()) / mean_norm if mean_norm > 0 else math.inf
    unit = states / states.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cosines = unit @ unit.T
    count = states.shape[0]
    mean_cosine = float((cosines.sum() - cosines.diagonal().sum()) / (count * (count - 1)))
    return spread, mean_cosine


@dataclass(frozen=True)
class Reading:
    """One row of the report: a number and what it says."""

    probe: str
    quantity: str
    value: Optional[float]
    reading: str

    def to_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "quantity": self.quantity, "value": self.value, "reading": self.reading}


def _difference(first: Optional[float], second: Optional[float]) -> Optional[float]:
    return None if first is None or second is None else first - second


def readings(probes: Probes, has_segmenter: bool, has_depth_tokens: bool) -> tuple[list[Reading], list[str]]:
    """The report's rows and the broken links, in the order of the chain."""
    rows: list[Reading] = []
    broken: list[str] = []
    image = "1. image reliance"
    gap = _difference(probes.nll_rolled.value, probes.nll_true.value)
    rows += [Reading(image, "L_LLM, true images (nats/token)", probes.nll_true.value, f"{probes.nll_true.count} target tokens"),
             Reading(image, "L_LLM, images rolled", probes.nll_rolled.value,
                     "each sample shown the next sample's picture, the same text")]
    if gap is None:
        rows.append(Reading(image, "rolled - true", None, "every sample shows the same picture: nothing to compare"))
    elif gap < IMAGE_GAP_MIN:
        rows.append(Reading(image, "rolled - true", gap,
                            f"below {IMAGE_GAP_MIN}: the model does not look at the picture"))
        broken.append("image -> language model: the answers do not depend on the picture")
    else:
        rows.append(Reading(image, "rolled - true", gap, f"at least {IMAGE_GAP_MIN}: the answers depend on the picture"))
    if not has_depth_tokens:
        rows.append(Reading(image, "depth span", None, "skipped: the model has no depth tokens"))
    elif not probes.span_true.count:
        rows.append(Reading(image, "depth span", None, "skipped: no depth span among these targets"))
    else:
        span_gap = _difference(probes.span_rolled.value, probes.span_true.value)
        rows += [Reading(image, "depth-span CE, true images", probes.span_true.value, f"{probes.span_true.count} span tokens"),
                 Reading(image, "depth-span CE, images rolled", probes.span_rolled.value, "the same spans, the wrong picture")]
        if span_gap is not None and span_gap < IMAGE_GAP_MIN:
            rows.append(Reading(image, "span: rolled - true", span_gap,
                                f"below {IMAGE_GAP_MIN}: the depth tokens are written without looking at the picture"))
            broken.append("image -> depth span: the depth tokens do not depend on the picture")
        else:
            rows.append(Reading(image, "span: rolled - true", span_gap,
                                f"at least {IMAGE_GAP_MIN}: the depth tokens depend on the picture"
                                if span_gap is not None else "no batch with two pictures"))
    seg = "2. [SEG] state spread"
    decoder = "3. decoder prompt reliance"
    if not has_segmenter:
        rows.append(Reading(seg, "[SEG] states", None, "skipped: the model has no segmentation head"))
        rows.append(Reading(decoder, "mask decoder", None, "skipped: the model has no segmentation head"))
        return rows, broken
    states = torch.cat(probes.seg_states) if probes.seg_states else torch.zeros(0, 1)
    spread, cosine = seg_spread(states)
    if spread is None or cosine is None:
        rows.append(Reading(seg, "[SEG] states", float(states.shape[0]), "fewer than 2 [SEG] targets with a mask: skipped"))
    else:
        same = spread < SEG_SPREAD_MIN or cosine > SEG_COSINE_MAX
        rows += [Reading(seg, "||std|| / ||mean||", spread,
                         f"{states.shape[0]} states; below {SEG_SPREAD_MIN}: nearly one state for every expression"
                         if spread < SEG_SPREAD_MIN else f"{states.shape[0]} states; at least {SEG_SPREAD_MIN}: they differ"),
                 Reading(seg, "mean pairwise cosine", cosine,
                         f"above {SEG_COSINE_MAX}: the states point the same way" if cosine > SEG_COSINE_MAX
                         else f"at most {SEG_COSINE_MAX}: the states point different ways")]
        if same:
            broken.append("language model -> [SEG]: the [SEG] state hardly depends on the sample")
    if not probes.logit_change.count:
        rows.append(Reading(decoder, "mask logits", None, "no batch with two [SEG] targets with masks: skipped"))
        return rows, broken
    std = probes.logits.std
    reliance = probes.logit_change.value / std if std else math.inf
    rows += [Reading(decoder, "prompt change ||p - p_rolled|| / ||p||", probes.prompt_change.value,
                     "how much the projected prompt moved when the [SEG] states were rolled"),
             Reading(decoder, "logit std (own prompts)", std, f"over {probes.logits.count} mask pixels")]
    if reliance < PROMPT_RELIANCE_MIN:
        rows.append(Reading(decoder, "mean |logit change| / std", reliance,
                            f"below {PROMPT_RELIANCE_MIN}: the mask decoder ignores its prompt"))
        broken.append("[SEG] -> mask decoder: the masks do not depend on the prompt")
    else:
        rows.append(Reading(decoder, "mean |logit change| / std", reliance,
                            f"at least {PROMPT_RELIANCE_MIN}: the masks depend on the prompt"))
    gain = _difference(probes.iou_own.value, probes.iou_rolled.value)
    rows += [Reading(decoder, "mask IoU, own prompts", probes.iou_own.value, "mean over masks, at the decoder's resolution"),
             Reading(decoder, "mask IoU, rolled prompts", probes.iou_rolled.value,
                     f"own - rolled = {gain:+.3f}: " + ("own prompts segment no better than another sample's"
                                                        if gain is not None and gain < IOU_GAIN_MIN
                                                        else "own prompts segment better")),
             Reading(decoder, "mask DICE, own prompts", probes.dice_own.value, "mean over masks"),
             Reading(decoder, "mask DICE, rolled prompts", probes.dice_rolled.value, "mean over masks")]
    return rows, broken


def diagnose(model: "PerceptioModel", examples: Sequence["Example"], batch_size: int, device: torch.device,
             autocast: Callable[[], Any], on_batch: Callable[[int], None] = lambda done: None) -> Probes:
    """Run the probes over ``examples``: pictures interleaved, then batched in order; each sample is
    shown the picture of the next sample (in that order, cyclically) that shows another one."""
    diagnoser = Diagnoser(model, device, autocast)
    dealt = interleave_by_image(examples)
    partners = image_partners([picture_key(example) for example in dealt])
    for start in range(0, len(dealt), batch_size):
        chunk = dealt[start : start + batch_size]
        others = [dealt[partner] for partner in partners[start : start + batch_size]] if partners is not None else None
        diagnoser.add_batch(chunk, others)
        on_batch(len(chunk))
    return diagnoser.probes
