"""SAM's prompt encoder: points (with labels), boxes and a low-resolution mask prompt.

Sparse prompts (points, box corners) become one token each: a random-Fourier positional encoding
of the coordinate plus a learned embedding for its kind. A mask prompt is downscaled 4x by a small
conv net into a dense embedding added to the image embedding; without one a learned "no mask"
vector is broadcast instead.

Coordinates are in pixels of the padded model input frame (``input_image_size``, e.g. 1024x1024 for
the official models: the image resized so its longest side is 1024, then padded right/bottom).

Parameter names match segment-anything's ``PromptEncoder`` (``pe_layer.
positional_encoding_gaussian_matrix``, ``point_embeddings.{0..3}``, ``not_a_point_embed``,
``mask_downscaling.{0,1,3,4,6}``, ``no_mask_embed``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from fmrt.models.sam.common import LayerNorm2d

# Point labels. 2 and 3 are the box corners; they are valid point labels too, which is how
# segment-anything's ONNX decoder passes a box through the point inputs.
LABEL_PAD, LABEL_NEG, LABEL_POS, LABEL_BOX_TL, LABEL_BOX_BR = -1, 0, 1, 2, 3


def _checking() -> bool:
    """Value checks (which read tensor data) only in eager mode: under torch.export/compile or
    tracing they would be data-dependent branches."""
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al., "Fourier features").

    A fixed ``2 x F`` Gaussian matrix maps ``(x, y)`` in ``[-1, 1]^2`` to ``F`` frequencies;
    the encoding is ``[sin(2 pi f), cos(2 pi f)]`` (``2F`` channels). The matrix is a buffer,
    saved in checkpoints, so a model's encoding is reproducible.
    """

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix",
                             scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 2`` coordinates normalised to ``[0, 1]`` -> ``... x 2F``."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an ``h x w`` grid: ``2F x h x w``."""
        h, w = size
        g = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / h
        x = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """``B x N x 2`` pixel ``(x, y)`` coordinates in an ``(H, W)`` frame -> ``B x N x 2F``."""
        g = self.positional_encoding_gaussian_matrix
        coords = coords.to(g.dtype)
        norm = torch.stack([coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]], dim=-1)
        return self._pe_encoding(norm)


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Args:
        embed_dim: prompt token / dense embedding channels (256 for the official models).
        image_embedding_size: ``(h, w)`` of the image embedding (64x64 officially).
        input_image_size: ``(H, W)`` of the padded model input (1024x1024 officially).
        mask_in_chans: hidden channels of the mask-prompt downscaler (16 officially).
    """

    num_point_embeddings = 4  # negative point, positive point, box top-left, box bottom-right

    def __init__(self, *, embed_dim: int, image_embedding_size: Tuple[int, int],
                 input_image_size: Tuple[int, int], mask_in_chans: int) -> None:
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"prompt embed_dim must be even (sin + cos halves), got {embed_dim}")
        if mask_in_chans % 4:
            raise ValueError(f"mask_in_chans must be a multiple of 4, got {mask_in_chans}")
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim)
                                              for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell: ``1 x embed_dim x h x w``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    # ------------------------------------------------------------------ pieces
    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel index -> pixel centre
        if pad:
            # A "not a point" token when no box follows: the official models were trained so.
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), LABEL_PAD)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels.long()[..., None]  # B x N x 1
        # Padding tokens carry no position: zero their encoding, then add the kind embedding.
        # Written with where/multiplies (no in-place boolean indexing) so it traces and exports;
        # adding exact zeros keeps it bitwise equal to segment-anything's indexed version.
        pe = torch.where(labels == LABEL_PAD, torch.zeros_like(pe), pe)
        pe = pe + (labels == LABEL_PAD).to(pe.dtype) * self.not_a_point_embed.weight
        for i in range(self.num_point_embeddings):
            pe = pe + (labels == i).to(pe.dtype) * self.point_embeddings[i].weight
        return pe

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return pe + corner_embed  # 2 x C broadcast over the batch

    # ------------------------------------------------------------------ checks
    def _check(self, point_coords: Optional[torch.Tensor], point_labels: Optional[torch.Tensor],
               boxes: Optional[torch.Tensor], masks: Optional[torch.Tensor]) -> int:
        """Validate prompt shapes; return the prompt batch size."""
        sizes = {}
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None:
            if point_coords.dim() != 3 or point_coords.shape[-1] != 2:
                raise ValueError(f"point_coords must be B x N x 2 (x, y), got "
                                 f"{tuple(point_coords.shape)}")
            if point_labels.shape != point_coords.shape[:2]:
                raise ValueError(f"point_labels must be B x N = {tuple(point_coords.shape[:2])} to "
                                 f"match point_coords, got {tuple(point_labels.shape)}")
            if _checking() and point_labels.numel():
                if point_labels.is_floating_point() and not torch.equal(point_labels,
                                                                        point_labels.round()):
                    raise ValueError("point_labels must be whole numbers (-1, 0, 1, 2, 3)")
                lo, hi = int(point_labels.min()), int(point_labels.max())
                if lo < LABEL_PAD or hi > LABEL_BOX_BR:
                    raise ValueError(f"point_labels must be in -1..3 (-1 pad, 0 negative, "
                                     f"1 positive, 2/3 box corners), got values in [{lo}, {hi}]")
            sizes["point_coords"] = point_coords.shape[0]
        if boxes is not None:
            if not (boxes.dim() == 2 and boxes.shape[-1] == 4) and \
                    not (boxes.dim() == 3 and boxes.shape[1:] == (1, 4)):
                raise ValueError(f"boxes must be B x 4 (x0, y0, x1, y1), got {tuple(boxes.shape)}")
            sizes["boxes"] = boxes.shape[0]
        if masks is not None:
            if masks.dim() != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != self.mask_input_size:
                raise ValueError(f"mask prompt must be B x 1 x {self.mask_input_size[0]} x "
                                 f"{self.mask_input_size[1]} logits, got {tuple(masks.shape)}")
            sizes["masks"] = masks.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes differ: {sizes}")
        return next(iter(sizes.values())) if sizes else 1

    def forward(self, *, point_coords: Optional[torch.Tensor] = None,
                point_labels: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
                masks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            point_coords: ``B x N x 2`` point ``(x, y)`` in pixels of the padded input frame.
            point_labels: ``B x N`` labels: 1 positive, 0 negative, -1 padding (ignored),
                2/3 box top-left/bottom-right corner.
            boxes: ``B x 4`` (or ``B x 1 x 4``) ``x0, y0, x1, y1`` in pixels of the input frame.
            masks: ``B x 1 x 4h x 4w`` mask logits (e.g. a previous low-res prediction).
        Returns:
            sparse ``B x T x embed_dim`` tokens (points, plus one pad token when no box, plus 2
            box corners) and dense ``B x embed_dim x h x w`` embeddings.
        """
        bs = self._check(point_coords, point_labels, boxes, masks)
        w = self.no_mask_embed.weight
        sparse = w.new_zeros((bs, 0, self.embed_dim))
        if point_coords is not None:
            sparse = torch.cat([sparse, self._embed_points(point_coords, point_labels,
                                                           pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks.to(w.dtype))
        else:
            dense = w.reshape(1, -1, 1, 1).expand(bs, -1, *self.image_embedding_size)
        return sparse, dense
