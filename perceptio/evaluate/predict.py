"""Inference: from one image and prompt, one generated sequence -> the mask, the depth map, the answer.

1. The prompt (one question, or a conversation's earlier turns and the next question) is laid out
   as in training (the processor's chat template and image tokens; no image for a text-only
   conversation) and the answer generated greedily under :class:`PerceptionFormatProcessor`, so a
   depth span, when the model writes one, is always ``[D_START]`` + exactly n depth tokens +
   ``[D_END]``; spans in the earlier turns do not count.
2. Mask: the language model's last hidden state at the generated ``[SEG]`` token (the state the
   trainer supervises, at the position where ``[SEG]`` is the input) prompts the SAM2 mask decoder;
   its logits are upsampled bilinearly to the image's size and thresholded at probability 0.5.
3. Depth: the n codes of the span, decoded by the model's frozen VQ-VAE into its normalised
   inverse depth (near = +1), at the tokenizer's 320x320.
4. Answer: the generated text without the perception and special tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessorList

from perceptio.errors import PerceptioError
from perceptio.evaluate.decoding import PerceptionFormatProcessor
from perceptio.evaluate.metrics import PerceptionVocabulary, depth_span, readout_codes
from perceptio.train.chat import USER, Turn

# Room for [SEG], the 102-token depth span and a short answer; a caller can ask for more.
DEFAULT_MAX_NEW_TOKENS = 160


@dataclass
class Prediction:
    text: str  # the answer, perception tokens removed
    token_ids: list[int]  # every generated id
    mask: np.ndarray | None  # uint8 (H, W) at the image's size; None when no [SEG] was generated
    depth: np.ndarray | None  # float32 (S, S) normalised inverse depth; None without a well-formed span
    depth_codes: list[int] = field(default_factory=list)  # codes of the first span (even a malformed one)
    well_formed: bool = False
    readout_codes: list[int] = field(default_factory=list)  # codes after the span (--mark-readouts models)


def checkpoint_identity(folder: Path) -> str:
    """``<folder name>@<sha256[:12]>`` of the folder's model files (configs and weights), so that
    results name exactly what was evaluated."""
    digest = hashlib.sha256()
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix in (".json", ".safetensors"))
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"{folder.name}@{digest.hexdigest()[:12]}"


class Predictor:
    """Greedy, format-constrained inference with a :class:`perceptio.train.model.PerceptioModel`."""

    def __init__(self, model, identity: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.model = model.eval()
        self.identity = identity + (" (tiny)" if model.is_tiny else "")
        self.max_new_tokens = max_new_tokens
        self.vocabulary = PerceptionVocabulary(
            depth_token_ids=tuple(int(token) for token in model.depth_token_ids.tolist()),
            d_start_id=model.d_start_id,
            d_end_id=model.d_end_id,
            num_depth_tokens=model.config.num_depth_tokens,
        )
        tokenizer = model.processor.tokenizer
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(model.processor.end_of_turn())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_of_turn_id

    @property
    def device(self) -> torch.device:
        return self.model.depth_token_ids.device

    @classmethod
    def from_checkpoint(cls, folder: str | Path, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                        dtype: str | None = None) -> "Predictor":
        """Load an exported model onto this process's GPU (``LOCAL_RANK`` under torchrun) or the CPU;
        ``dtype``: storage of the frozen weights (auto: bf16 on a GPU), as in training."""
        from perceptio.train.model import PerceptioModel

        folder = Path(folder)
        if not folder.is_dir():
            raise PerceptioError(f"checkpoint folder not found: {folder}")
        model = PerceptioModel.from_pretrained(folder, dtype=dtype)
        if torch.cuda.is_available():
            model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        return cls(model, checkpoint_identity(folder), max_new_tokens)

    def _processor(self, width: int, answer_starts: list[int]) -> PerceptionFormatProcessor:
        vocabulary = self.vocabulary
        return PerceptionFormatProcessor(
            vocabulary.depth_token_ids,
            vocabulary.d_start_id,
            vocabulary.d_end_id,
            vocabulary.num_depth_tokens,
            # A model trained without depth tokens must not start a span it never learned to close.
            max_spans=1 if self.model.config.use_depth_tokens else 0,
            max_length=width + self.max_new_tokens,
            prompt_length=answer_starts,
            readouts=self.model.config.mark_readouts,
        )

    def predict(self, image: Image.Image | None, prompt: str | Sequence[Any]) -> Prediction:
        """The answer to ``prompt``: one question, or a conversation's turns so far (ending with the
        user's, as :class:`perceptio.train.chat.Turn` or ``{"role", "text"}``); ``image`` None: text only."""
        return self.predict_batch([image], [prompt])[0]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[Image.Image | None], prompts: Sequence[str | Sequence[Any]],
                      answer_prefixes: Sequence[str] | None = None) -> list[Prediction]:
        """Generate for several (image, prompt) pairs at once: prompts left-padded, greedy, the
        format constraint applied per row; the same tokens as one call per pair. A prompt is a
        question or a conversation's turns so far; an image may be None (a text-only conversation).
        ``answer_prefixes``: text each answer is made to begin with (teacher forcing at inference,
        e.g. the true depth span before the letter); the format constraint counts it as written,
        and the prediction holds what the model wrote after it."""
        if answer_prefixes is not None and len(answer_prefixes) != len(prompts):
            raise ValueError(f"{len(answer_prefixes)} answer prefixes for {len(prompts)} prompts")
        model = self.model
        processor = model.processor
        pictures = [image.convert("RGB") if image is not None else None for image in images]
        tiles = [processor.pixel_values(picture) if picture is not None else None for picture in pictures]
        prompt_ids = [processor.token_ids(processor.conversation_prompt(
                          [Turn(USER, prompt)] if isinstance(prompt, str) else prompt,
                          len(values) if values is not None else None))
                      for prompt, values in zip(prompts, tiles)]
        prefix_ids = [processor.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
                      for prefix in (answer_prefixes or [""] * len(prompt_ids))]
        answer_lengths = [len(ids) for ids in prefix_ids]
        prompt_ids = [ids + prefix for ids, prefix in zip(prompt_ids, prefix_ids)]
        width = max(len(ids) for ids in prompt_ids)
        answer_starts = [width - length for length in answer_lengths]
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=self.device)
        present = [values for values in tiles if values is not None]
        # No pixel_values at all for text-only prompts: an explicit None sends generate down the image path.
        image_inputs = {"pixel_values": torch.cat(present).to(self.device, self._pixel_dtype())} if present else {}
        # Each generation step continues the spans (and so the cells) of the steps before it.
        tracking = model.cell_embeddings.decoding() if model.cell_embeddings is not None else contextlib.nullcontext()
        with self.autocast(), tracking:
            output = model.adapter.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **image_inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([self._processor(width, answer_starts)]),
                eos_token_id=self.end_of_turn_id,
                pad_token_id=self.pad_id,
            )
        generated = [self._until_end(row[width:].tolist()) for row in output]
        sequences = [ids + tokens for ids, tokens in zip(prompt_ids, generated)]
        masks = self._masks(pictures, tiles, sequences, prompt_ids, generated)
        predictions = []
        readouts = self.model.config.mark_readouts
        for tokens, mask, prefix in zip(generated, masks, prefix_ids):
            well_formed, codes = depth_span(tokens, self.vocabulary, readouts=readouts)
            predictions.append(Prediction(
                text=processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                token_ids=tokens,
                mask=mask,
                depth=self._depth(codes) if well_formed else None,
                depth_codes=codes,
                well_formed=well_formed,
                # After a given span (an answer prefix) the readouts follow the prefix's [D_END].
                readout_codes=readout_codes(prefix + tokens, self.vocabulary) if readouts else [],
            ))
        return predictions

    def _until_end(self, tokens: list[int]) -> list[int]:
        """A row's new tokens up to its end-of-turn (rows that finish early are padded after it)."""
        return tokens[: tokens.index(self.end_of_turn_id) + 1] if self.end_of_turn_id in tokens else tokens

    def _pixel_dtype(self) -> torch.dtype:
        return next(self.model.adapter.vision_modules()[0].parameters()).dtype

    def autocast(self):
        """bf16 autocast where bf16 weights are present (frozen bf16 beside fp32 trained weights)."""
        holds_bf16 = any(parameter.dtype == torch.bfloat16 for parameter in self.model.parameters())
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=holds_bf16)

    def _masks(self, pictures: list[Image.Image | None], tiles: list[torch.Tensor | None], sequences: list[list[int]],
               prompt_ids: list[list[int]], generated: list[list[int]]) -> list[np.ndarray | None]:
        """Masks of the rows that generated [SEG]: their unpadded sequences, right-padded into one
        forward (causal attention: the padding after a row changes nothing before it)."""
        model = self.model
        rows = [row for row, tokens in enumerate(generated)
                if model.segmenter is not None and model.seg_token_id in tokens and pictures[row] is not None]
        masks: list[np.ndarray | None] = [None] * len(generated)
        if not rows:
            return masks
        width = max(len(sequences[row]) for row in rows)
        ids = torch.tensor([sequences[row] + [self.pad_id] * (width - len(sequences[row])) for row in rows], device=self.device)
        attention = torch.tensor([[1] * len(sequences[row]) + [0] * (width - len(sequences[row])) for row in rows],
                                 device=self.device)
        pixel_values = torch.cat([tiles[row] for row in rows]).to(self.device, self._pixel_dtype())
        with self.autocast():
            hidden = model.adapter.last_hidden_state(ids, attention, pixel_values)
            for index, row in enumerate(rows):
                position = len(prompt_ids[row]) + generated[row].index(model.seg_token_id)
                seg_hidden = hidden[index : index + 1, position]
                picture = pictures[row]
                sam_pixels = model.processor.sam_pixel_values(picture)[None].to(seg_hidden.device, self._pixel_dtype())
                predicted = model.segmenter.predict_masks(sam_pixels, seg_hidden, size=(picture.height, picture.width))
                masks[row] = predicted[0].cpu().numpy().astype(np.uint8)
        return masks

    def _depth(self, codes: list[int]) -> np.ndarray | None:
        vqvae = self.model.depth_vqvae
        if vqvae is None:
            return None
        decoded = vqvae.decode(torch.tensor([codes], dtype=torch.long, device=self.device))
        return decoded[0].float().cpu().numpy()
