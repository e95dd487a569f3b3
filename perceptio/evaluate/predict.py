"""Inference: from one image and prompt, one generated sequence -> the mask, the depth map, the answer.

1. The prompt is laid out as in training (the model's adapter: chat markup and image tokens) and
   the answer generated greedily under :class:`PerceptionFormatProcessor`, so a depth span, when
   the model writes one, is always ``[D_START]`` + exactly n depth tokens + ``[D_END]``.
2. Mask: the language model's last hidden state at the generated ``[SEG]`` token (the state the
   trainer supervises, at the position where ``[SEG]`` is the input) prompts the SAM2 mask decoder;
   its logits are upsampled bilinearly to the image's size and thresholded at probability 0.5.
3. Depth: the n codes of the span, decoded by the model's frozen VQ-VAE into its normalised
   inverse depth (near = +1), at the tokenizer's 320x320.
4. Answer: the generated text without the perception and special tokens.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessorList

from perceptio.errors import PerceptioError
from perceptio.evaluate.decoding import PerceptionFormatProcessor
from perceptio.evaluate.metrics import PerceptionVocabulary, depth_span

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
        self.identity = identity + (" (tiny)" if model.config.is_tiny else "")
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
    def from_checkpoint(cls, folder: str | Path, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> "Predictor":
        """Load an exported model onto this process's GPU (``LOCAL_RANK`` under torchrun) or the CPU."""
        from perceptio.train.model import PerceptioModel

        folder = Path(folder)
        if not folder.is_dir():
            raise PerceptioError(f"checkpoint folder not found: {folder}")
        model = PerceptioModel.from_pretrained(folder)
        if torch.cuda.is_available():
            model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        return cls(model, checkpoint_identity(folder), max_new_tokens)

    def _processor(self, prompt_length: int) -> PerceptionFormatProcessor:
        vocabulary = self.vocabulary
        return PerceptionFormatProcessor(
            vocabulary.depth_token_ids,
            vocabulary.d_start_id,
            vocabulary.d_end_id,
            vocabulary.num_depth_tokens,
            # A model trained without depth tokens must not start a span it never learned to close.
            max_spans=1 if self.model.config.use_depth_tokens else 0,
            max_length=prompt_length + self.max_new_tokens,
        )

    @torch.inference_mode()
    def predict(self, image: Image.Image, prompt: str) -> Prediction:
        model = self.model
        image = image.convert("RGB")
        processor = model.processor
        pixel_values = processor.pixel_values(image).to(self.device, model.adapter.model.dtype)
        prompt_text = processor.prompt_text(prompt, num_tiles=pixel_values.shape[0])
        input_ids = torch.tensor([processor.token_ids(prompt_text)], device=self.device)
        attention_mask = torch.ones_like(input_ids)
        output = model.adapter.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([self._processor(input_ids.shape[1])]),
            eos_token_id=self.end_of_turn_id,
            pad_token_id=self.pad_id,
        )
        generated = output[0, input_ids.shape[1] :].tolist()
        well_formed, codes = depth_span(generated, self.vocabulary)
        return Prediction(
            text=model.processor.tokenizer.decode(generated, skip_special_tokens=True).strip(),
            token_ids=generated,
            mask=self._mask(image, output, pixel_values, len(input_ids[0]), generated),
            depth=self._depth(codes) if well_formed else None,
            depth_codes=codes,
            well_formed=well_formed,
        )

    def _mask(self, image: Image.Image, sequence: torch.Tensor, pixel_values: torch.Tensor, prompt_length: int,
              generated: list[int]) -> np.ndarray | None:
        model = self.model
        if model.segmenter is None or model.seg_token_id not in generated:
            return None
        position = prompt_length + generated.index(model.seg_token_id)
        hidden = model.adapter.last_hidden_state(sequence, torch.ones_like(sequence), pixel_values)
        seg_hidden = hidden[:, position]
        sam_pixels = model.processor.sam_pixel_values(image)[None].to(seg_hidden.device, seg_hidden.dtype)
        masks = model.segmenter.predict_masks(sam_pixels, seg_hidden, size=(image.height, image.width))
        return masks[0].cpu().numpy().astype(np.uint8)

    def _depth(self, codes: list[int]) -> np.ndarray | None:
        vqvae = self.model.depth_vqvae
        if vqvae is None:
            return None
        decoded = vqvae.decode(torch.tensor([codes], dtype=torch.long, device=self.device))
        return decoded[0].float().cpu().numpy()
