"""Every loss term against a hand computation: explicit loops over positions on a full logits tensor.

The batch mixes a valid span of exactly n depth tokens, a sample without any span, a sample whose
``[D_END]`` is missing, a short span (padded in L_DepthRecon) and a long one (truncated).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perceptio.train import losses

D_START, D_END = 3, 4
DEPTH_IDS = torch.tensor([5, 6, 7, 8])  # code k is token DEPTH_IDS[k]
N = 3  # depth tokens per span in this toy vocabulary
VOCAB = 10
X = -100
LABELS = torch.tensor(
    [
        [X, X, 3, 5, 6, 7, 4, 1, 2, X, X],  # valid, l = 3 = n
        [X, X, 1, 2, 0, 1, X, X, X, X, X],  # no span
        [X, X, 0, 3, 5, 6, 7, 8, 5, 1, 2],  # [D_START] but no [D_END]
        [X, X, 3, 8, 5, 4, 0, X, X, X, X],  # valid, l = 2 < n
        [X, 3, 5, 6, 7, 8, 4, 0, X, X, X],  # valid, l = 4 > n
    ]
)
BATCH = LABELS.shape[0]


def full_logits(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*LABELS.shape, VOCAB, generator=generator) * 2


def ce(logits: torch.Tensor, label: int) -> torch.Tensor:
    return F.cross_entropy(logits[None], torch.tensor([label]))


def hand_spans(labels: list[int]) -> tuple[int, int] | None:
    if D_START not in labels:
        return None
    start = labels.index(D_START)
    return (start, labels.index(D_END, start)) if D_END in labels[start:] else None


def terms_from(supervised: losses.SupervisedLogits, labels: torch.Tensor, decode_soft, depth_target, has_depth):
    nll = supervised.token_nll()
    spans = losses.find_depth_spans(labels, D_START, D_END)
    return {
        "llm": losses.llm_loss(supervised, nll),
        "marker": losses.depth_marker_loss(supervised, nll, spans),
        "token": losses.depth_token_loss(supervised, nll, spans),
        "count": losses.depth_count_loss(supervised, spans, DEPTH_IDS, N),
        "recon": losses.depth_recon_loss(supervised, spans, DEPTH_IDS, N, decode_soft, depth_target, has_depth),
    }


class LinearDepthDecoder:
    """A stand-in for the VQ-VAE's decode_soft: codebook mixing, then a fixed linear map to 2x3 pixels."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.codebook = torch.randn(len(DEPTH_IDS), 2, generator=generator)
        self.weight = torch.randn(N * 2, 6, generator=generator)

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        assert probs.shape[1:] == (N, len(DEPTH_IDS))
        return ((probs @ self.codebook).flatten(1) @ self.weight).view(-1, 2, 3)


def test_spans_found_as_defined():
    spans = losses.find_depth_spans(LABELS, D_START, D_END)
    for b, row in enumerate(LABELS.tolist()):
        expected = hand_spans(row)
        assert bool(spans.valid[b]) == (expected is not None)
        if expected:
            assert (int(spans.start[b]), int(spans.end[b])) == expected
            assert int(spans.length[b]) == expected[1] - expected[0] - 1
        else:
            assert int(spans.length[b]) == 0


def test_llm_marker_token_terms_match_loops():
    logits = full_logits()
    supervised = losses.SupervisedLogits.from_full_logits(logits, LABELS)
    nll = supervised.token_nll()
    spans = losses.find_depth_spans(LABELS, D_START, D_END)

    every = [ce(logits[b, t - 1], y) for b, row in enumerate(LABELS.tolist()) for t, y in enumerate(row) if y != X and t > 0]
    assert torch.allclose(losses.llm_loss(supervised, nll), torch.stack(every).mean())

    # The span's tokens weighted: [D_START] .. [D_END] of valid spans at 0.1, every other token at 1.
    weighted, weight = torch.tensor(0.0), 0.0
    for b, row in enumerate(LABELS.tolist()):
        span = hand_spans(row)
        for t, y in enumerate(row):
            if y != X and t > 0:
                w = 0.1 if span and span[0] <= t <= span[1] else 1.0
                weighted, weight = weighted + w * ce(logits[b, t - 1], y), weight + w
    weights = losses.llm_token_weights(supervised, spans, 0.1)
    assert torch.allclose(losses.llm_loss(supervised, nll, weights), weighted / weight)
    assert torch.allclose(losses.llm_loss(supervised, nll, losses.llm_token_weights(supervised, spans, 1.0)),
                          torch.stack(every).mean())

    marker = torch.tensor(0.0)
    token = torch.tensor(0.0)
    for b, row in enumerate(LABELS.tolist()):
        span = hand_spans(row)
        if span is None:
            continue
        s, e = span
        marker = marker + ce(logits[b, s - 1], D_START) + ce(logits[b, e - 1], D_END)
        interior = range(s + 1, e)
        token = token + sum(ce(logits[b, t - 1], row[t]) for t in interior) / len(interior)
    assert torch.allclose(losses.depth_marker_loss(supervised, nll, spans), marker / BATCH)
    assert torch.allclose(losses.depth_token_loss(supervised, nll, spans), token / BATCH)



def test_answer_weight_covers_the_tokens_after_the_span_and_its_readouts():
    # Row 0: span 2..6, readout codes 6 and 8 after it, answer 1 2 from position 10; row 1: span
    # 1..4, answer from 5; row 2: no [D_END], no answer; row 3: no span.
    labels = torch.tensor([
        [X, X, 3, 5, 6, 7, 4, 0, 6, 8, 1, 2],
        [X, 3, 5, 6, 4, 1, 2, 0, X, X, X, X],
        [X, X, 3, 5, 6, 1, 2, X, X, X, X, X],
        [X, 1, 2, 6, 0, X, X, X, X, X, X, X],
    ])
    logits = torch.randn(*labels.shape, VOCAB, generator=torch.Generator().manual_seed(3))
    supervised = losses.SupervisedLogits.from_full_logits(logits, labels)
    spans = losses.find_depth_spans(labels, D_START, D_END)
    starts = losses.answer_starts(labels, spans, DEPTH_IDS)
    assert starts.tolist() == [10, 5, labels.shape[1], labels.shape[1]]

    weighted, weight = torch.tensor(0.0), 0.0
    for b, row in enumerate(labels.tolist()):
        span = hand_spans(row)
        codes_after = [t for t, y in enumerate(row) if span and t > span[1] and y in DEPTH_IDS.tolist()]
        answer_from = max([span[1], *codes_after]) + 1 if span else len(row)
        for t, y in enumerate(row):
            if y != X and t > 0:
                w = 0.5 if span and span[0] <= t <= span[1] else 4.0 if t >= answer_from else 1.0
                weighted, weight = weighted + w * ce(logits[b, t - 1], y), weight + w
    weights = losses.llm_token_weights(supervised, spans, 0.5, starts, 4.0)
    assert torch.allclose(losses.llm_loss(supervised, supervised.token_nll(), weights), weighted / weight)

def test_count_term_is_expected_run_length_penalty():
    logits = full_logits()
    supervised = losses.SupervisedLogits.from_full_logits(logits, LABELS)
    spans = losses.find_depth_spans(LABELS, D_START, D_END)
    expected = 0.0
    for b, row in enumerate(LABELS.tolist()):
        span = hand_spans(row)
        if span is None:
            continue
        s, e = span
        survive = 1.0
        for j, t in enumerate(range(s + 1, e + 1)):  # steps j = 0..l_b
            keep_writing_codes = torch.softmax(logits[b, t - 1].double(), -1)[DEPTH_IDS].sum().item()
            expected += survive * (1 - keep_writing_codes) * math.log(1 + abs(j - N))
            survive *= keep_writing_codes
        expected += survive * math.log(1 + abs(e - s - N))  # still writing codes at [D_END]: length l_b + 1
    assert losses.depth_count_loss(supervised, spans, DEPTH_IDS, N).item() == pytest.approx(expected / BATCH, rel=1e-5)


def test_count_term_has_a_gradient_and_vanishes_for_a_perfect_model():
    logits = full_logits().requires_grad_(True)
    supervised = losses.SupervisedLogits.from_full_logits(logits, LABELS)
    spans = losses.find_depth_spans(LABELS, D_START, D_END)
    losses.depth_count_loss(supervised, spans, DEPTH_IDS, N).backward()
    assert logits.grad.abs().sum() > 0

    # A model that is certain of every ground-truth token writes exactly l_b codes: for the sample
    # with l_b = n the penalty is 0; with l_b = 2 and 4 it is log(2) each.
    certain = torch.full((*LABELS.shape, VOCAB), -60.0)
    for b, row in enumerate(LABELS.tolist()):
        for t, y in enumerate(row):
            if y != X and t > 0:
                certain[b, t - 1, y] = 60.0
    supervised = losses.SupervisedLogits.from_full_logits(certain, LABELS)
    value = losses.depth_count_loss(supervised, spans, DEPTH_IDS, N)
    assert value.item() == pytest.approx(2 * math.log(2) / BATCH, abs=1e-6)


def test_recon_term_mixes_codes_pads_truncates_and_skips():
    logits = full_logits()
    decoder = LinearDepthDecoder()
    target = torch.randn(BATCH, 2, 3, generator=torch.Generator().manual_seed(2))
    has_depth = torch.tensor([True, True, True, True, True])
    supervised = losses.SupervisedLogits.from_full_logits(logits, LABELS)
    spans = losses.find_depth_spans(LABELS, D_START, D_END)
    value = losses.depth_recon_loss(supervised, spans, DEPTH_IDS, N, decoder, target, has_depth)

    expected = 0.0
    for b, row in enumerate(LABELS.tolist()):
        span = hand_spans(row)
        if span is None or span[1] - span[0] - 1 == 0:
            continue
        s, e = span
        rows = [torch.softmax(logits[b, t - 1, DEPTH_IDS], -1) for t in range(s + 1, e)][:N]
        rows += [torch.full((len(DEPTH_IDS),), 1 / len(DEPTH_IDS))] * (N - len(rows))
        decoded = decoder(torch.stack(rows)[None])[0]
        expected += ((decoded - target[b]) ** 2).mean().item()
    assert value.item() == pytest.approx(expected / BATCH, rel=1e-5)

    # Without a depth target the sample contributes nothing.
    only_first = torch.tensor([True, False, False, False, False])
    alone = losses.depth_recon_loss(supervised, spans, DEPTH_IDS, N, decoder, target, only_first)
    s, e = hand_spans(LABELS[0].tolist())
    probs = torch.stack([torch.softmax(logits[0, t - 1, DEPTH_IDS], -1) for t in range(s + 1, e)])
    assert alone.item() == pytest.approx(((decoder(probs[None])[0] - target[0]) ** 2).mean().item() / BATCH, rel=1e-5)


@pytest.mark.parametrize("rows", [[1], [2], [1, 2]], ids=["no-span", "missing-end", "both"])
def test_samples_without_a_valid_span_give_zero_depth_terms(rows):
    labels = LABELS[rows]
    logits = full_logits()[rows].requires_grad_(True)
    supervised = losses.SupervisedLogits.from_full_logits(logits, labels)
    target = torch.zeros(len(rows), 2, 3)
    terms = terms_from(supervised, labels, LinearDepthDecoder(), target, torch.ones(len(rows), dtype=torch.bool))
    assert terms["llm"].item() > 0
    for name in ("marker", "token", "count", "recon"):
        assert terms[name].item() == 0.0, name
        # Each zero term on its own still belongs to the graph (DDP needs every rank's graph to
        # reach the same parameters), and gives the logits an all-zero gradient.
        assert terms[name].grad_fn is not None, name
        (grad,) = torch.autograd.grad(terms[name], logits, retain_graph=True, allow_unused=True)
        assert grad is not None and not grad.any(), name


def test_restricted_logits_equal_full_logits_path():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(*LABELS.shape, 6, generator=generator, requires_grad=True)
    head = torch.nn.Linear(6, VOCAB, bias=False)
    decoder = LinearDepthDecoder()
    target = torch.randn(BATCH, 2, 3, generator=generator)
    has_depth = torch.ones(BATCH, dtype=torch.bool)

    restricted = losses.SupervisedLogits.from_hidden(hidden, LABELS, head)
    supervised_rows = int(((LABELS != X)[:, 1:]).sum())
    assert restricted.logits.shape == (supervised_rows, VOCAB)  # never a [B, T, V] tensor
    fast = terms_from(restricted, LABELS, decoder, target, has_depth)
    fast_grad = torch.autograd.grad(sum(fast.values()), hidden)[0]

    full = losses.SupervisedLogits.from_full_logits(head(hidden), LABELS)
    reference = terms_from(full, LABELS, decoder, target, has_depth)
    reference_grad = torch.autograd.grad(sum(reference.values()), hidden)[0]
    for name in fast:
        assert torch.allclose(fast[name], reference[name], atol=1e-6), name
    assert torch.allclose(fast_grad, reference_grad, atol=1e-6)


def test_segmentation_terms_match_pixel_loops():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.0, -3.0, 1.5]], [[-0.5, 0.25, 1.0], [3.0, -2.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
    bce, dice = losses.segmentation_losses(logits, target)
    bces, dices = [], []
    for m in range(2):
        total, inter, p_sum, g_sum = 0.0, 0.0, 0.0, 0.0
        for x, g in zip(logits[m].flatten().tolist(), target[m].flatten().tolist()):
            p = 1 / (1 + math.exp(-x))
            total += -(g * math.log(p) + (1 - g) * math.log(1 - p))
            inter, p_sum, g_sum = inter + p * g, p_sum + p, g_sum + g
        bces.append(total / 6)
        dices.append(1 - (2 * inter + 1) / (p_sum + g_sum + 1))
    assert bce.item() == pytest.approx(sum(bces) / 2, rel=1e-5)
    assert dice.item() == pytest.approx(sum(dices) / 2, rel=1e-5)
    empty = losses.segmentation_losses(torch.zeros(0, 2, 3), torch.zeros(0, 2, 3))
    assert [term.item() for term in empty] == [0.0, 0.0]


def test_masked_label_inside_a_span_is_an_error():
    labels = LABELS[[0]].clone()
    labels[0, 4] = X  # a depth position without a label: its logits were never computed
    supervised = losses.SupervisedLogits.from_full_logits(full_logits()[[0]], labels)
    spans = losses.find_depth_spans(labels, D_START, D_END)
    with pytest.raises(ValueError, match="no supervised logits"):
        losses.depth_token_loss(supervised, supervised.token_nll(), spans)


def test_each_seg_is_paired_in_order_with_its_own_mask():
    seg, ignore = 7, losses.IGNORE_INDEX
    labels = torch.tensor([
        [ignore, 3, seg, 4, seg, 5, seg],  # three [SEG]s, two masks: the third pairs with nothing
        [ignore, ignore, 3, 4, 5, 6, 2],  # no [SEG]
        [ignore, seg, 3, ignore, ignore, ignore, ignore],  # one [SEG], two masks (second cut off)
    ])
    rows, positions, masks = losses.seg_pairs(labels, seg, torch.tensor([2, 0, 2]))
    assert list(zip(rows.tolist(), positions.tolist(), masks.tolist())) == [(0, 2, 0), (0, 4, 1), (2, 1, 0)]
    # A [SEG] in the prompt (ignored label) is not a target and is never paired.
    rows, _, _ = losses.seg_pairs(torch.tensor([[ignore, ignore]]), seg, torch.tensor([1]))
    assert rows.numel() == 0


def test_request_counts_take_the_words_since_the_previous_seg():
    seg, pad = 9, 0
    input_ids = torch.tensor([
        [1, 2, 3, 2, seg, 4, 5, seg, 6],  # a caption: the second [SEG]'s request is "4 5"
        [8, 3, 3, seg, 6, pad, pad, pad, pad],  # 8 is markup: not a word of the request
    ])
    plain = (input_ids != 8) & (input_ids != pad) & (input_ids != seg)
    rows, positions = torch.tensor([0, 0, 1]), torch.tensor([4, 7, 3])
    counts = losses.request_counts(input_ids, plain, seg, rows, positions, vocab_size=10)
    expected = torch.zeros(3, 10)
    for row, words in enumerate(([1, 2, 3, 2], [4, 5], [3, 3])):
        for word in words:
            expected[row, word] += 1
    assert torch.equal(counts, expected)


def test_seg_text_loss_matches_a_loop():
    generator = torch.Generator().manual_seed(3)
    read = torch.randn(3, 4, generator=generator)
    embedding = torch.randn(6, 4, generator=generator)
    counts = torch.tensor([[1.0, 1, 0, 0, 0, 0], [0, 0, 2, 1, 0, 0], [1, 1, 0, 0, 0, 0]])  # rows 0 and 2: one request
    loss = losses.seg_text_loss(read, counts, embedding)
    meanings = [sum(counts[j, v] * embedding[v] for v in range(6)) / counts[j].sum() for j in range(3)]
    total = 0.0
    for i in range(3):
        scores = [F.cosine_similarity(read[i], meanings[j], dim=0).item() / losses.SEG_TEXT_TEMPERATURE for j in range(3)]
        log_norm = math.log(sum(math.exp(score) for score in scores))
        own = [j for j in range(3) if torch.equal(counts[i], counts[j])]
        total += -sum(scores[j] - log_norm for j in own) / len(own)
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)
    # A reader that points each state at its own request scores lower than one that points elsewhere.
    aligned = torch.stack([meanings[0], meanings[1], meanings[2]])
    assert losses.seg_text_loss(aligned, counts, embedding) < losses.seg_text_loss(aligned.roll(1, 0), counts, embedding)
