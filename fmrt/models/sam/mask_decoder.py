"""SAM's mask decoder: a two-way transformer over [IoU token, 4 mask tokens, prompt tokens] and the
image embedding, then per-mask hypernetwork MLPs whose outputs are dotted with a 4x upscaled image
embedding, and an MLP head predicting each mask's IoU.

Mask token 0 is the single-mask output (used when one unambiguous mask is wanted, e.g. with
several points or a box); tokens 1..3 are the multimask outputs (whole / part / subpart for an
ambiguous single click).

The upscaling + projection step is isolated in ``MaskDecoder._upscale_and_project`` so that it
can be switched to the fused kernel ``fmrt.kernels.decode_masks`` with one call.

Parameter names match segment-anything's ``MaskDecoder`` (``iou_token``, ``mask_tokens``,
``output_upscaling.{0,1,3}``, ``output_hypernetworks_mlps.{i}.layers.{j}``,
``iou_prediction_head.layers.{j}``, ``transformer.*``).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmrt.models.sam.common import MLP, LayerNorm2d, workspace
from fmrt.models.sam.two_way_transformer import TwoWayTransformer


@functools.lru_cache(maxsize=8)
def _subpixel_order(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Index of ``upscale_tokens``' sub-pixel order (i, j, a, b, a', b') for each pixel of the
    ``4h x 4w`` mask in raster order (row ``4i + 2a + a'``, column ``4j + 2b + b'``)."""
    return torch.arange(16 * h * w, device=device).reshape(h, w, 2, 2, 2, 2).permute(
        0, 2, 4, 1, 3, 5).reshape(-1)


class MaskDecoder(nn.Module):
    """Args:
        transformer_dim: token / image-embedding channels (256 officially).
        transformer: the ``TwoWayTransformer``.
        num_multimask_outputs: ambiguity-resolving masks (3); one more token makes the single mask.
        iou_head_depth, iou_head_hidden_dim: the IoU MLP (3 layers of 256 officially).
    """

    def __init__(self, *, transformer_dim: int, transformer: TwoWayTransformer,
                 num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256) -> None:
        super().__init__()
        if transformer_dim % 8:
            raise ValueError(f"transformer_dim must be a multiple of 8 (upscaling to dim/8 "
                             f"channels), got {transformer_dim}")
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        # Two stride-2 transposed convolutions: 4x the embedding grid (64 -> 256 officially),
        # channels dim -> dim/4 -> dim/8 (256 -> 64 -> 32).
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens,
                                       iou_head_depth)

    # ------------------------------------------------------------------ pieces
    def _upscale_and_project(self, src: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """The per-pixel mask head.

        Args:
            src: ``B x C x h x w`` image tokens after the two-way transformer.
            hyper_in: ``B x M x C/8`` hypernetwork outputs of the M wanted mask tokens.
        Returns:
            ``B x M x 4h x 4w`` mask logits.

        Plain torch; the fused ``fmrt.kernels.decode_masks`` computes the same thing per pixel
        without materialising the ``B x C/8 x 4h x 4w`` upscaled embedding.
        """
        up = self.output_upscaling(src)
        b, c, h, w = up.shape
        return (hyper_in @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)

    def upscale_tokens(self, keys, hyper_in: torch.Tensor, hw: Tuple[int, int]
                       ) -> torch.Tensor:
        """The mask head of ``_upscale_and_project`` on image tokens in token order, for
        inference: ``keys`` ``B x h*w x C`` (or ``FactoredImageTokens`` of B prompts),
        ``hyper_in`` ``B x M x C/8``; returns ``B x M x 4h x 4w`` logits (same maths, float
        rounding only).

        A stride-2 2x2 transposed convolution maps each input pixel to its own 2x2 output
        block, so it is one GEMM ``C_in x 4 C_out`` per pixel, and the outputs can stay in
        sub-pixel order (pixel, a, b, channel) through the LayerNorm (over the channels, now
        the contiguous last dim: one fused ``layer_norm``), both GELUs and the hypernetwork
        product; only the ``B x M`` masks are put in image order at the end. On shapes-sam
        (56 prompts, 16x16 -> 64x64, one thread, shared box) the two ``conv_transpose2d``
        calls took ~10 and ~17 ms and LayerNorm2d's 9 passes ~7 ms; here the two GEMMs take
        ~4-5 ms each and the LayerNorm one pass (the whole head 20-25 ms against 28-43 ms);
        from factored tokens the first GEMM is ``K`` deep per prompt
        (``FactoredImageTokens.project``)."""
        up1, ln, _, up2, _ = self.output_upscaling
        C = self.transformer_dim
        c1, c2 = up1.out_channels, up2.out_channels
        h, w = hw
        B, M = hyper_in.shape[:2]
        w1 = up1.weight.permute(0, 2, 3, 1).reshape(C, 4 * c1)      # ci x (a, b, co)
        b1 = up1.bias.repeat(4)
        if isinstance(keys, torch.Tensor):
            y = torch.addmm(b1, keys.reshape(-1, C), w1)
        else:
            y = keys.project(w1, b1)
        y = F.gelu(F.layer_norm(y.reshape(-1, c1), (c1,), ln.weight, ln.bias, ln.eps))
        w2 = up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)     # c1 x (a', b', c2)
        # (i, j, a, b) x (a', b', c2), the head's largest intermediate: written into a reused
        # buffer and activated in place (see common.workspace); only when nothing records
        # gradients (inference_mode / no_grad), since the buffer outlives the call
        if torch.is_grad_enabled():
            y = F.gelu(torch.addmm(up2.bias.repeat(4), y, w2))
        else:
            out = workspace("mask_head", (y.shape[0], w2.shape[1]), y)
            y = torch.ops.aten.gelu_(torch.addmm(up2.bias.repeat(4), y, w2, out=out))
        masks = torch.bmm(hyper_in, y.reshape(B, h * w * 16, c2).transpose(1, 2))
        # (i, j, a, b, a', b') -> row 4i + 2a + a', column 4j + 2b + b': one gather (an 8-d
        # permute copy with inner extent 2 is ~7x slower)
        idx = _subpixel_order(h, w, masks.device)
        return masks.reshape(B * M, -1).index_select(1, idx).reshape(B, M, 4 * h, 4 * w)

    def _run(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
             sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transformer pass: returns (src ``B x C x h x w``, hyper_in ``B x 4 x C/8``,
        iou_pred ``B x 4``)."""
        keys, hyper_in, iou = self._run_tokens(image_embeddings, image_pe,
                                               sparse_prompt_embeddings, dense_prompt_embeddings)
        bs, c = hyper_in.shape[0], self.transformer_dim
        src = keys.expand(bs, -1, -1).transpose(1, 2).reshape(bs, c, *image_embeddings.shape[-2:])
        return src, hyper_in, iou

    def _run_tokens(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                    sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                    factored: bool = False, multimask_only: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_run`` without the image-order copy: returns (image tokens ``B x h*w x C`` (batch
        1 when shared), hyper_in ``B x 4 x C/8``, iou_pred ``B x 4``). Callers that need the
        mask head for a subset of prompts (the automatic generator) select rows first; with
        ``factored`` the image tokens may come back as ``FactoredImageTokens`` (B prompts on
        one image at inference, see ``TwoWayTransformer.can_factor``), whose
        ``materialize(rows)`` forms only the selected prompts' tokens. ``multimask_only``:
        hyper_in holds only the 3 multimask outputs (``B x 3 x C/8``); the single-mask
        token is left out of the final attention and the hypernetworks (iou_pred keeps all
        4: the IoU head reads only the IoU token)."""
        bs = sparse_prompt_embeddings.shape[0]
        c = self.transformer_dim
        if sparse_prompt_embeddings.dim() != 3 or sparse_prompt_embeddings.shape[-1] != c:
            raise ValueError(f"sparse prompt embeddings must be B x T x {c}, got "
                             f"{tuple(sparse_prompt_embeddings.shape)}")
        if image_embeddings.dim() != 4 or image_embeddings.shape[1] != c:
            raise ValueError(f"image embeddings must be B x {c} x h x w, got "
                             f"{tuple(image_embeddings.shape)}")
        if image_embeddings.shape[0] not in (1, bs):
            raise ValueError(f"image embeddings batch {image_embeddings.shape[0]} must be 1 "
                             f"(shared by all prompts) or the prompt batch {bs}")
        hw = tuple(image_embeddings.shape[-2:])
        if tuple(dense_prompt_embeddings.shape[-3:]) != (c,) + hw or \
                dense_prompt_embeddings.shape[0] not in (1, bs):
            raise ValueError(f"dense prompt embeddings must be B x {c} x {hw[0]} x {hw[1]}, got "
                             f"{tuple(dense_prompt_embeddings.shape)}")
        if tuple(image_pe.shape[-3:]) != (c,) + hw:
            raise ValueError(f"image_pe must be 1 x {c} x {hw[0]} x {hw[1]}, got "
                             f"{tuple(image_pe.shape)}")

        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(bs, -1, -1),
                            sparse_prompt_embeddings], dim=1)
        # One image embedding shared by every prompt (the predictor's case): expand, no copy,
        # until the dense prompt is added. With one dense prompt too (no mask prompt: the
        # no-mask embedding) the sum stays batch 1 at inference and the transformer computes
        # its first layer's image-side projections once for all prompts.
        if not self.training and image_embeddings.shape[0] == 1 and \
                dense_prompt_embeddings.shape[0] == 1:
            src = image_embeddings + dense_prompt_embeddings
        else:
            src = image_embeddings.expand(bs, -1, -1, -1) + dense_prompt_embeddings
        # only the IoU and (wanted) mask tokens' outputs are read: the final attention skips
        # the rest
        masks = range(1 if multimask_only else 0, self.num_mask_tokens)
        hs, keys = self.transformer(src, image_pe, tokens, factored=factored,
                                    final_tokens=[0] + [1 + i for i in masks] if multimask_only
                                    else 1 + self.num_mask_tokens)
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + j, :])
                                for j, i in enumerate(masks)], dim=1)
        return keys, hyper_in, self.iou_prediction_head(hs[:, 0, :])

    # ------------------------------------------------------------------ public
    def predict_masks(self, *, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor,
                      dense_prompt_embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks: ``B x 4 x 4h x 4w`` logits and ``B x 4`` IoU
        predictions (index 0 the single-mask output)."""
        src, hyper_in, iou_pred = self._run(image_embeddings, image_pe, sparse_prompt_embeddings,
                                            dense_prompt_embeddings)
        return self._upscale_and_project(src, hyper_in), iou_pred

    def forward(self, *, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for a batch of prompts.

        Args:
            image_embeddings: ``1 x C x h x w`` (shared by all prompts) or ``B x C x h x w``.
            image_pe: ``1 x C x h x w`` dense positional encoding (``PromptEncoder.get_dense_pe``).
            sparse_prompt_embeddings: ``B x T x C`` point/box tokens.
            dense_prompt_embeddings: ``B x C x h x w`` mask-prompt (or no-mask) embeddings.
            multimask_output: the 3 multimask outputs, else only the single-mask output.
        Returns:
            ``B x M x 4h x 4w`` low-res mask logits and ``B x M`` IoU predictions, M = 3 or 1.
        """
        src, hyper_in, iou_pred = self._run(image_embeddings, image_pe, sparse_prompt_embeddings,
                                            dense_prompt_embeddings)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        # Only the wanted masks are projected: the per-mask dot products are independent.
        return self._upscale_and_project(src, hyper_in[:, sel]), iou_pred[:, sel]
