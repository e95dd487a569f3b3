"""The training stage's settings, torch-free (transformers style): what to build, what to read, how to train.

Every default of ``perceptio-train`` is written here once; :mod:`perceptio.train.cli` reads its option
defaults from these dataclasses, so importing this module (for ``--help``, or a tool that only
writes configs) loads neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from perceptio.errors import PerceptioError
from perceptio.tokens import DEFAULT_NUM_DEPTH_TOKENS, MAX_MARKS

CONFIG_NAME = "perceptio.json"  # an exported model's record: its format and PerceptioConfig

TINY = "tiny"  # the model id of the built-in random-weight TINY model (perceptio.train.tiny)
# The training split's name in COCO-style ("train") and ADE20k-style ("training") datasets.
TRAINING_SPLITS = ("train", "training")
NEW_TOKEN_INITS = ("mean", "spread")  # PerceptioConfig.new_token_init


@dataclass
class PerceptioConfig:
    """What to build and how to weigh the losses (defaults: the paper's, on a 1B InternVL)."""

    # InternVL3-1B in transformers format: the smallest checkpoint of the paper's family that
    # ``InternVLForConditionalGeneration`` loads (the paper's InternVL2.5-4B/8B exist only as
    # remote-code checkpoints; InternVL3-8B-hf is the larger drop-in).
    model: str = "OpenGVLab/InternVL3-1B-hf"
    sam_model: str = "facebook/sam2.1-hiera-tiny"  # transformers-format SAM 2.1 Hiera-T
    # Hub revisions (branch, tag or commit) of the two base models; "" = the default branch, and the
    # commit a hub load resolved to is recorded here so that an exported model reloads the same bases.
    model_revision: str = ""
    sam_revision: str = ""
    tokenizer: str = ""  # depth VQ-VAE folder (perceptio-tokenize)
    lora_rank: int = 256  # the paper's
    lora_alpha: int = 512  # scaling alpha / r = 2, the LISA / Sa2VA convention (the paper gives none)
    lora_dropout: float = 0.05
    # Full fine-tuning of the language model (every weight, the whole embedding and output head)
    # instead of LoRA + new-token rows. :meth:`for_model` turns it on for the TINY random-weight
    # model: its frozen random layers and tied head keep echoing the current input token, which a
    # low-rank update does not undo in a short run.
    train_language_model: bool = False
    freeze_vision: bool = True
    # SAM2's image encoder is frozen in the paper (pretrained); random weights must learn to see, so
    # :meth:`for_model` trains both encoders of the TINY model unless told otherwise.
    freeze_sam_encoder: bool = True
    crop_to_patches: bool = False  # one 448 tile (256 image tokens); True: InternVL's dynamic tiling
    gradient_checkpointing: bool = False
    # Storage of the *frozen* base weights: auto (bfloat16 on a GPU, float32 on the CPU) | bfloat16 |
    # float32. Trainable weights (LoRA, new token rows, SAM2 decoder, [SEG] projector) are always
    # float32: AdamW's updates at lr 4e-5 would mostly round away in bf16. The loop runs bf16
    # autocast wherever bf16 weights are present, so frozen bf16 and trainable fp32 mix.
    dtype: str = "auto"
    max_length: int = 8192  # the paper's maximum sequence length; longer examples lose their tail
    # How the new tokens' input rows start (the paper does not say): "mean" puts them all on the old
    # rows' mean (transformers' mean resizing), one vector that training pulls apart; "spread" draws
    # each around that mean with the old rows' per-dimension spread, so that every depth code is as
    # distinct at the input as any word from the first step. In the miniature both read spans alike
    # (README section 4), so the default stays transformers'. Untied output rows start at the mean
    # either way, so that the new tokens begin with ordinary logits.
    new_token_init: str = "mean"
    num_depth_tokens: int = DEFAULT_NUM_DEPTH_TOKENS  # n
    lambda_m: float = 0.3
    lambda_t: float = 0.5
    lambda_c: float = 0.2
    lambda_d: float = 1.0
    lambda_r: float = 1.0
    seg_bce: float = 1.0
    seg_dice: float = 0.25
    # Weight of L_SegText (not in the paper; 0 = the paper's objective): the [SEG] state, through a
    # linear reader, must pick the words that asked for it out of the batch's other requests. A real
    # VLM's [SEG] state carries its request already; the miniature's 2-layer model learns to carry
    # it from this term, not from the mask loss (README "Perceptio in miniature").
    seg_text: float = 0.0
    # Weight in L_LLM of each token of a depth span ([D_START] .. [D_END]), the other answer tokens
    # weighing 1 (not in the paper; 1 = its plain mean). A letter after a 100-token span is ~1% of
    # its answer's loss: below 1 it is not drowned, and L_depth still trains the span (README section 4).
    span_weight: float = 1.0
    # Weight in L_LLM of each answer token after a depth span and its readouts (the letter, its
    # brackets, the end of turn), the other tokens weighing 1 (not in the paper; 1 = its mean). With
    # --mark-readouts the letter is one token among its 2-5 readout codes; a text probe answered its
    # questions far better when the letter weighed as much as all of them (README section 4; from the
    # marks' rows, it later turned out, not the lookup).
    answer_weight: float = 1.0
    # After a question's depth span, each mark's letter and its cell's code ("A[D_k] B[D_k]") before
    # the letter (not in the paper; off = its format): the lookup of the marked cells is then written
    # out and supervised code by code, and the letter compares codes written just before it. Neither a
    # text probe of the miniature's size nor the fine-tuned miniature learnt it on questions only the
    # span answers (README section 4). The predictor lets such models write depth codes after the span.
    mark_readouts: bool = False
    # A learned vector per cell of the depth grid added to the image tokens over that cell and to the
    # span token of that cell (perceptio.train.cells; not in the paper): "the same place" is then
    # matched by content across the 100+ positions between a mark and its code. Text probes of the
    # miniature's size learnt the mark-to-code lookup only with it (README, "The lookup learnt").
    # One whole-picture tile per image (no --crop-to-patches: a crop's tokens are not the grid's).
    cell_embeddings: bool = False
    # Weight of L_EyeDepth (not in the paper; 0 = off): a linear head on each image token regresses the
    # depth under its patch (perceptio.train.eye_depth), so that the vision tower learns to see depth
    # from a dense signal; a pretrained tower arrives with it, the miniature's learnt none through the
    # language model alone (README section 4). Training only; one whole-picture tile per image.
    eye_depth: float = 0.0
    # Ablations (the paper's tables): without depth tokens / segmentation / L_DepthRecon / L_depth.
    use_depth_tokens: bool = True
    use_segmentation: bool = True
    use_depth_recon: bool = True
    use_depth_loss: bool = True

    def __post_init__(self) -> None:
        if self.new_token_init not in NEW_TOKEN_INITS:
            raise PerceptioError(f"--new-token-init must be one of {', '.join(NEW_TOKEN_INITS)}, not {self.new_token_init!r}")
        if self.cell_embeddings and self.crop_to_patches:
            raise PerceptioError("--cell-embeddings needs one whole-picture tile per image: it goes without --crop-to-patches")
        if self.eye_depth < 0:
            raise PerceptioError(f"--eye-depth is a loss weight, at least 0, not {self.eye_depth}")
        if self.eye_depth and self.crop_to_patches:
            raise PerceptioError("--eye-depth needs one whole-picture tile per image: it goes without --crop-to-patches")
        side = round(self.num_depth_tokens ** 0.5)
        if self.cell_embeddings and side * side != self.num_depth_tokens:
            raise PerceptioError(f"--cell-embeddings needs a square depth grid, not {self.num_depth_tokens} depth tokens")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PerceptioConfig":
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PerceptioError(f"unknown PerceptioConfig fields: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def for_model(cls, **values: Any) -> "PerceptioConfig":
        """A config from the given values; ``None`` means the default, which for ``train_language_model``
        is on for the TINY model and off (LoRA) otherwise."""
        config = cls(**{name: value for name, value in values.items() if value is not None})
        if values.get("train_language_model") is None:
            config.train_language_model = config.is_tiny
        for name in ("freeze_vision", "freeze_sam_encoder"):
            if values.get(name) is None:
                setattr(config, name, not config.is_tiny)
        return config

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY


# How marked-point questions are taught: as each records (half direct, half with the depth span
# first, by a stable hash of its key), all one way, or each question both ways.
QUESTION_TARGETS = ("recorded", "direct", "depth", "both")


@dataclass
class StreamConfig:
    """What to read and how to mix and shuffle it (see :mod:`perceptio.train.data`)."""

    shards: list[Path | str]  # shard folders: paths or object-store URLs (perceptio.fs)
    mix: dict[str, float] | None = None
    splits: tuple[str, ...] = TRAINING_SPLITS
    seed: int = 0
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    use_depth_tokens: bool = True
    question_targets: str = "recorded"  # see QUESTION_TARGETS
    # Per sample with marked-point questions and a depth map, this many more drawn afresh each epoch
    # on any cells and answered by the map (perceptio.curate.marked_points.reading_question).
    reading_questions: int = 0
    # Where in its cell a reading question's point falls: the central share of the cell's width and
    # height. 1: anywhere, as curated points fall; 1/3 keeps a whole disc mark inside its cell, which
    # a fine-tuned miniature learned to read and did not carry over to off-centre points (README section 4).
    reading_spread: float = 1.0
    # The share of reading questions asked after a span whose codes at the marked cells are shuffled
    # among them and answered by that span (marked_points.swapped_reading_question): questions the
    # picture cannot answer, so that the letter must read the span. Written span first, with the span
    # as context (not a target, no L_depth); only where reading questions are written span first.
    reading_swaps: float = 0.0
    mark_readouts: bool = False  # PerceptioConfig.mark_readouts: questions written span, readouts, letter
    # Each readout names its mark's cell before the code ("A 3 7[D_055]"; not in the paper): the model
    # writes where it found the mark, and the code is looked up from those words, as in a question
    # asked in text.
    readout_cells: bool = False
    # The share of reading questions asked in text alone (not in the paper): no picture, the marks
    # named by their cells in the prompt, the span as context: the question without the image tokens
    # and prompt in front of the span (README section 4; the miniature did not learn the lookup this
    # way either). Span-first questions only.
    reading_in_text: float = 0.0
    # A curriculum (not in the paper): in epoch e (from 0) each reading question's span shows only
    # reading_short_spans[e] of its cells, the marked ones among them, the others hidden from
    # attention; later epochs show whole spans. Fewer cells compete for each mark while the lookup is
    # learnt: a text probe learnt it over 100 cells only after spans of 16 and 36 (README, "The
    # lookup learnt"). A short span is context (no depth target).
    reading_short_spans: tuple[int, ...] = ()
    prompts: str = "prompts.json"

    def __post_init__(self) -> None:
        if self.question_targets not in QUESTION_TARGETS:
            raise PerceptioError(f"question targets must be one of {', '.join(QUESTION_TARGETS)}, not {self.question_targets!r}")
        if self.reading_questions < 0:
            raise PerceptioError(f"--reading-questions must be at least 0, not {self.reading_questions}")
        if not 0 < self.reading_spread <= 1:
            raise PerceptioError(f"--reading-spread must be in (0, 1], not {self.reading_spread}")
        if not 0 <= self.reading_swaps <= 1:
            raise PerceptioError(f"--reading-swaps must be in [0, 1], not {self.reading_swaps}")
        if not 0 <= self.reading_in_text <= 1:
            raise PerceptioError(f"--reading-in-text must be in [0, 1], not {self.reading_in_text}")
        if any(cells < MAX_MARKS for cells in self.reading_short_spans):
            raise PerceptioError(f"--reading-short-spans must show at least {MAX_MARKS} cells (a question's marks), "
                                 f"not {', '.join(map(str, self.reading_short_spans))}")

    def visible_cells(self, epoch: int) -> int | None:
        """How many cells of a reading question's span epoch ``epoch`` shows; None: all."""
        return self.reading_short_spans[epoch] if epoch < len(self.reading_short_spans) else None


def writes_readouts(mark_readouts: bool, use_depth_tokens: bool, question_targets: str) -> bool:
    """Whether ``--mark-readouts`` takes effect: readouts follow a question's span, so none without
    depth tokens or with every question answered directly."""
    return mark_readouts and use_depth_tokens and question_targets != "direct"


CHOICES = {"precision": ("auto", "bf16", "fp32"), "parallel": ("ddp", "fsdp"), "export": ("adapter", "merged", "none")}
RUN_FILES = ("metrics.jsonl", "checkpoints", "model")  # what a run writes into --out


@dataclass
class TrainConfig:
    """How to train; ``perceptio-train --help`` documents each field."""

    steps: int
    out: Path = Path("train-out")
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 4e-5  # the paper's
    # Peak learning rate of the segmentation head ([SEG] projector, SAM2 decoder, and SAM2's encoder
    # when trained); None: ``lr``. At the tiny model's lr 1e-2 the SAM2 decoder cannot fit even one
    # example (README, "Perceptio in miniature"); the paper uses one rate for all.
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup: float = 0.05  # share of the steps with a linear warm-up
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 2
    save_every: int = 0  # 0: only at the end
    precision: str = "auto"  # auto (bf16 on GPUs, fp32 on CPU) | bf16 | fp32
    parallel: str = "ddp"  # ddp | fsdp (only matters under torchrun)
    resume: bool = False
    # A run's exported model (adapter format) whose trained weights replace the new ones at the start:
    # a second stage of fine-tuning on the same base models, with a fresh optimizer and schedule.
    init_from: Path | None = None
    export: str = "adapter"  # adapter | merged | none
    progress: bool = True
    max_bad_samples: str = "0.01"  # skipped samples tolerated: a count, or a share of those read (bad_data.py)
    keep_last: int = 0  # checkpoints kept (the newest); 0: all

    # The TINY random-weight model's own defaults, measured on 200-step demo runs (README,
    # "Measured"): batches of 8 with lr 1e-2 give well-formed depth spans on held-out images; batches
    # of 1 are too noisy to learn to write 100 codes in 200 steps, 2e-3 leaves greedy decoding
    # repeating [D_START], 2e-2 is worse than 1e-2.
    # The head's 1e-3: tests/test_train_learns.py (one example's mask reaches IoU 0.98 at 1e-3, 0.63 at 1e-2).
    TINY_DEFAULTS: ClassVar[dict[str, Any]] = {"batch_size": 8, "lr": 1e-2, "head_lr": 1e-3}

    @classmethod
    def for_model(cls, is_tiny: bool, **values: Any) -> "TrainConfig":
        """A config from the given values; ``None`` means the default (the TINY model's where it has one)."""
        config = cls(**{name: value for name, value in values.items() if value is not None})
        if is_tiny:
            config = replace(config, **{name: value for name, value in cls.TINY_DEFAULTS.items() if values.get(name) is None})
        return config

    def check(self) -> None:
        """Refuse impossible settings (cheap: call it before loading a model)."""
        if min(self.steps, self.batch_size, self.grad_accum) < 1:
            raise PerceptioError("--steps, --batch-size and --grad-accum must be at least 1")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise PerceptioError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        # A second run into the same folder would silently rewrite metrics.jsonl next to the first
        # run's checkpoints: continuing needs --resume, starting over another --out.
        previous = [name for name in RUN_FILES if (Path(self.out) / name).exists()]
        if previous and not self.resume:
            raise PerceptioError(
                f"{self.out} already holds a run ({', '.join(previous)}): pass --resume to continue it, or choose another --out"
            )
        BadSampleLimit.parse(self.max_bad_samples)
        if self.init_from is not None and not (Path(self.init_from) / CONFIG_NAME).is_file():
            raise PerceptioError(f"--init-from {self.init_from} is not an exported model (no {CONFIG_NAME})")


@dataclass(frozen=True)
class BadSampleLimit:
    """``--max-bad-samples``: ``N`` (a count), or ``F`` below 1 / ``P%`` (a share of the samples read).

    A share allows ``max(1, share x samples read)`` bad samples, so that one bad sample among the
    first few read does not stop a run that a share is meant to let through.
    """

    count: int | None = None
    share: float | None = None

    @classmethod
    def parse(cls, text: str) -> "BadSampleLimit":
        value = text.strip()
        try:
            if value.endswith("%"):
                share = float(value[:-1]) / 100
            elif value.isdigit():
                return cls(count=int(value))
            else:
                share = float(value)
        except ValueError:
            share = -1.0
        if not 0 <= share < 1:
            raise PerceptioError(f"--max-bad-samples {text!r} is not a count (100), a fraction below 1 (0.01) or a percentage (1%)")
        return cls(share=share)

    def allowed(self, read: int) -> float:
        return float(self.count) if self.count is not None else max(1.0, (self.share or 0.0) * read)

    def exceeded(self, skipped: int, read: int) -> bool:
        return skipped > self.allowed(read)

    def describe(self) -> str:
        return f"{self.count}" if self.count is not None else f"{(self.share or 0.0):.4g} of the samples read"
