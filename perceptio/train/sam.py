"""The segmentation head: the [SEG] hidden state prompts a SAM2 mask decoder (transformers ``Sam2Model``).

As in LISA / Sa2VA / the paper: SAM2's image encoder is frozen (run without gradients), an MLP
projects the language model's last-layer hidden state at the ``[SEG]`` token into SAM2's prompt
space, and that one vector is the decoder's only sparse prompt (no points, no boxes; the dense
prompt is SAM2's "no mask" embedding). ``Sam2Model.forward`` takes no prompt embeddings, so the
decoder is called directly. The decoder (including its two high-resolution feature convolutions)
is trained.

The predicted mask is the decoder's low-resolution output, a quarter of the input side (256x256 for
SAM2 at 1024). SAM2's image and mask preprocessing live in :mod:`perceptio.train.processor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Sam2Model


class SamSegmenter(nn.Module):
    """Frozen SAM2 image encoder + trainable mask decoder + the [SEG] projection MLP."""

    def __init__(self, sam: Sam2Model, text_hidden_size: int):
        super().__init__()
        self.sam = sam
        prompt_size = sam.config.prompt_encoder_config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(text_hidden_size, text_hidden_size),
            nn.ReLU(),
            nn.Linear(text_hidden_size, prompt_size),
        )
        sam.requires_grad_(False)
        sam.mask_decoder.requires_grad_(True)
        # Nothing supervises the IoU and object-score predictions (there is no point or box prompt
        # to score); left trainable they would get no gradient, which DDP rejects.
        sam.mask_decoder.iou_prediction_head.requires_grad_(False)
        sam.mask_decoder.pred_obj_score_head.requires_grad_(False)
        # Training supervises mask token 0 only; at inference SAM2 would otherwise swap in one of
        # its (untrained here) multimask outputs when token 0's mask looks "unstable".
        sam.mask_decoder.dynamic_multimask_via_stability = False

    @property
    def image_size(self) -> int:
        return int(self.sam.config.prompt_encoder_config.image_size)

    def image_features(self, sam_pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """SAM2's multi-scale features (B, C, h, w), high resolution first, ready for the decoder."""
        with torch.no_grad():
            encoded = self.sam.vision_encoder(sam_pixel_values, return_dict=True)
        features = list(encoded.fpn_hidden_states)
        # The two high-resolution convolutions belong to the (trained) decoder: outside no_grad.
        decoder = self.sam.mask_decoder
        features[0] = decoder.conv_s0(features[0])
        features[1] = decoder.conv_s1(features[1])
        features[-1] = features[-1] + self.sam.no_memory_embedding.view(1, -1, 1, 1)
        return features

    def forward(self, sam_pixel_values: torch.Tensor, seg_hidden: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, M, M) from images (B, 3, S, S) and [SEG] hidden states (B, D)."""
        features = self.image_features(sam_pixel_values)
        batch = sam_pixel_values.shape[0]
        sparse = self.projector(seg_hidden).view(batch, 1, 1, -1)
        embedding = features[-1]
        dense = self.sam.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1).expand(batch, -1, *embedding.shape[-2:])
        positions = self.sam.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1)
        masks, _, _, _ = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_positional_embeddings=positions,
            sparse_prompt_embeddings=sparse.to(embedding.dtype),
            dense_prompt_embeddings=dense,
            multimask_output=False,
            high_resolution_features=features[:-1],
        )
        return masks[:, 0, 0]

    def predict_masks(self, sam_pixel_values: torch.Tensor, seg_hidden: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Boolean masks (B, H, W) at an image's original size, for evaluation."""
        logits = self.forward(sam_pixel_values, seg_hidden)
        upsampled = F.interpolate(logits[:, None].float(), size=size, mode="bilinear", align_corners=False)
        return upsampled[:, 0] > 0
