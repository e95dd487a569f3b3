"""L_EyeDepth (``--eye-depth W``; not in the paper): each image token regresses the depth under it.

The paper starts from a pretrained vision tower whose image tokens already carry the scene's
geometry (depth is linearly decodable from the features of pretrained ViTs); the depth span only
has to be read off them. The miniature's tower is tiny and pretrained on colours and places, and
the span's loss reaches it through the language model too weakly to teach it depth: after 3200
steps of fine-tuning, a linear probe of its image tokens reads their cells' depth codes no better
than each cell's most frequent code (README section 4). This term gives the tower the dense
signal directly: a linear head maps each image token to the ``SUB x SUB`` mean depths of the patch
it covers, against the example's depth target (the map L_DepthRecon compares with: the teacher's
depth under the tokenizer's normalisation), by mean squared error. The head is used in training
only; what it teaches stays in the tower.

One example: a 280-pixel tile is 10x10 image tokens; its depth target (320x320) is averaged to
20x20 and cut into the 2x2 block under each token, token k (row-major) getting block k. Examples
without a picture or without a depth target add nothing; a tile must be the whole picture (no
``--crop-to-patches``), so that the target covers what the tokens see.
"""

from __future__ import annotations

import torch
from torch import nn

from perceptio.errors import PerceptioError

SUB = 2  # depth values per side of an image token's patch: 2x2 per token


def token_depth_blocks(depth: torch.Tensor, side: int, sub: int = SUB) -> torch.Tensor:
    """(N, side * side, sub * sub): depth maps (N, S, S) averaged to a (side * sub)^2 grid, each
    row-major token's ``sub x sub`` block, row-major inside the block."""
    pooled = nn.functional.adaptive_avg_pool2d(depth[:, None].float(), side * sub)[:, 0]
    blocks = pooled.reshape(-1, side, sub, side, sub).permute(0, 1, 3, 2, 4)
    return blocks.reshape(-1, side * side, sub * sub)


class EyeDepthHead(nn.Module):
    """The head and the hook that keeps the image tokens' features of the current forward."""

    def __init__(self, width: int, tokens_per_tile: int, image_token_id: int, sub: int = SUB):
        super().__init__()
        self.side = int(round(tokens_per_tile ** 0.5))
        if self.side * self.side != tokens_per_tile:
            raise PerceptioError(f"--eye-depth needs a square grid of image tokens per tile, not {tokens_per_tile}")
        self.sub, self.image_token_id = sub, image_token_id
        self.head = nn.Linear(width, sub * sub)
        self._features: torch.Tensor | None = None

    def attach(self, image_projector: nn.Module) -> None:
        """Hook onto the module whose output holds each tile's image tokens, row-major."""
        image_projector.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, features: torch.Tensor) -> None:
        # Only training forwards keep them (with their graph); evaluation and generation keep nothing.
        self._features = features if self.training else None

    def loss(self, input_ids: torch.Tensor, depth_target: torch.Tensor, has_depth: torch.Tensor) -> torch.Tensor:
        """The term for the batch whose forward just ran: the mean squared error over every block of
        every example with a picture and a depth target; zero (in the head's graph) when there is none."""
        features, self._features = self._features, None
        anchor = sum(parameter.sum() for parameter in self.head.parameters()) * 0.0
        if features is None:
            return anchor
        # One tile per picture, in the batch's order: example b's tile is the count of pictures before it.
        has_image = (input_ids == self.image_token_id).any(1)
        tile_of = torch.cumsum(has_image.long(), 0) - 1
        chosen = has_image & has_depth.bool()
        if not chosen.any():
            return anchor
        predicted = self.head(features[tile_of[chosen]].float())
        target = token_depth_blocks(depth_target[chosen], self.side, self.sub)
        return nn.functional.mse_loss(predicted, target) + anchor
