"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Each block runs (1) self-attention of the tokens, (2) token -> image cross-attention, (3) an MLP on
the tokens and (4) image -> token cross-attention, each followed by a residual add and LayerNorm.
Positional encodings are re-added to the queries and keys of every attention (the first block's
self-attention skips them: its tokens *are* the prompt embeddings). A final token -> image
attention closes the stack.

Cross-attentions project to ``embedding_dim / attention_downsample_rate`` channels (128 of 256
officially): the image side has h*w = 4096 tokens, so this halves their cost.

Inference fast paths (``eval()`` mode; same maths, float rounding only: outputs within ~1.5e-6
of the plain path on shapes-sam-tiny and sam_vit_b shapes), for many prompts on one image, the
automatic mask generator's case (64 prompts per call):
  * the image may be given once (batch 1) for B prompts: the first block's image-side
    projections (token -> image k/v, image -> token q) run once per image, not once per prompt
    as in segment-anything, which repeats the image embedding per prompt;
  * later blocks, whose image tokens depend on the prompt, project k/v/q with one stacked GEMM
    and add the (batch-1) positional part once instead of adding ``key_pe`` to every prompt's
    copy of the image;
  * image -> token attention folds its output projection into the ~7 token values
    (``_image_to_token_residual``) and takes its softmax over the token axis with the image
    axis contiguous.
Measured (1 thread, shared 2-core box): the transformer for 64 prompts on a 16x16 grid
(shapes-sam-tiny shapes) 0.21 s -> 0.07 s; 16 prompts on 64x64 (sam_vit_b) 2.1 s -> 0.95 s.

Parameter names match segment-anything's ``TwoWayTransformer``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from fmrt.models.attention import attention
from fmrt.models.sam.common import MLPBlock


class DownsampledAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the channel count by
    ``downsample_rate`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width "
                             f"{self.internal_dim} (= {embedding_dim} / {downsample_rate})")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q: B x Nq x C``, ``k, v: B x Nk x C`` -> ``B x Nq x C``."""
        out = attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                        self._heads(self.v_proj(v)))
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


def _image_to_token_residual(attn: DownsampledAttention, keys: torch.Tensor,
                             img_q: torch.Tensor, tok_k: torch.Tensor,
                             tok_v: torch.Tensor) -> torch.Tensor:
    """``keys + attn(image queries, tokens, tokens)`` with the output projection folded into the
    token values (inference fast path; same maths up to float rounding).

    ``keys``: ``Bq x HW x C`` residual, ``img_q``: ``Bq x HW x C'`` projected image queries (Bq =
    1 when the image is shared by all prompts, else B); ``tok_k`` / ``tok_v``: ``B x T x C``
    un-projected token keys / values. Returns ``B x HW x C``.

    With T ~ 7 tokens and 4-8 heads, ``out_proj(sum_t p_t v_t) = sum_{h,t} p_{h,t} (W_o,h v_{h,t})
    + b``: the projection runs on B*H*T token vectors instead of B*HW image tokens (one
    ``HW x H*T @ H*T x C`` product per prompt instead of ``HW x C' @ C' x C``), and the per-head
    attention output and its head transpose are never materialised. For a shared image the
    scores of all prompts are one ``HW x d @ d x B*T`` product per head.
    """
    B, T, _ = tok_k.shape
    H, c = attn.num_heads, attn.internal_dim
    d = c // H
    bq, n, _ = img_q.shape
    k = attn.k_proj(tok_k).reshape(B, T, H, d)
    v = attn.v_proj(tok_v).reshape(B, T, H, d)
    w_o = attn.out_proj.weight.reshape(-1, H, d)                      # C x H x d
    u = torch.einsum("bthd,chd->bhtc", v, w_o).reshape(B, H * T, -1)  # B x HT x C
    q = img_q.reshape(bq, n, H, d) * (d ** -0.5)
    # Scores are laid out token-major (T before HW): the softmax over the T ~ 7 tokens then runs
    # along a strided dim with the HW image tokens contiguous (vectorised), ~10x faster on CPU
    # than a softmax over a last dim of 7.
    if bq == 1:   # one H x (B*T) x HW product per head for all prompts
        scores = torch.matmul(k.permute(2, 0, 1, 3).reshape(H, B * T, d),
                              q[0].permute(1, 2, 0))                    # H x BT x HW
        p = scores.reshape(H, B, T, n).softmax(2).transpose(0, 1)       # B x H x T x HW
    else:
        scores = torch.matmul(k.transpose(1, 2), q.permute(0, 2, 3, 1))  # B x H x T x HW
        p = scores.softmax(2)
    p = p.reshape(B, H * T, n)
    return torch.baddbmm((keys + attn.out_proj.bias).expand(B, -1, -1), p.transpose(1, 2), u)


def _fold_token_queries(attn: DownsampledAttention, tok_q: torch.Tensor) -> torch.Tensor:
    """Token queries with the key projection folded in (inference fast path).

    ``tok_q``: ``B x T x C`` un-projected token queries. Returns ``B x H*T x C`` rows ``a`` such
    that the scaled score of token ``t``, head ``h`` against an image token ``x`` (un-projected,
    ``C`` wide) is ``a[h*T + t] . x`` plus a term constant over ``x`` (``q . b_k``), which a
    softmax over the image axis cancels. Scoring B*H*T ~ 28-56 folded rows against the image
    costs ``HW x C x H*T`` per prompt instead of projecting every prompt's image tokens
    (``HW x C x C'``, C' = 64-128): 2.3x fewer products at T = 7 tokens.
    """
    B, T, C = tok_q.shape
    H = attn.num_heads
    d = attn.internal_dim // H
    q = attn.q_proj(tok_q).reshape(B, T, H, d) * (d ** -0.5)
    return torch.einsum("bthd,hdc->bhtc", q, attn.k_proj.weight.reshape(H, d, C)).reshape(
        B, H * T, C)


def _token_to_image_out(attn: DownsampledAttention, p: torch.Tensor, values: torch.Tensor,
                        T: int) -> torch.Tensor:
    """The token -> image attention's output from its probabilities ``p`` (``B x H*T x HW``,
    rows sum to 1) over un-projected image values ``values`` (``B x HW x C``): the value
    projection runs after the weighted sum (``W_v sum_x p(x) v(x) + b_v``, exact since the
    weights sum to 1), on H*T vectors per prompt instead of HW. Returns ``B x T x C``."""
    B, _, n = p.shape
    C = values.shape[-1]
    H, c1 = attn.num_heads, attn.internal_dim
    d = c1 // H
    pv = torch.bmm(p, values).reshape(B, H, T, C)                      # sum_x p(x) v(x)
    v = torch.einsum("bhtc,hdc->bthd", pv, attn.v_proj.weight.reshape(H, d, C)).reshape(B, T, c1)
    return attn.out_proj(v + attn.v_proj.bias)


def _image_to_token_from_image(attn: DownsampledAttention, keys: torch.Tensor,
                               keys_pe: torch.Tensor, tok_k: torch.Tensor,
                               tok_v: torch.Tensor) -> torch.Tensor:
    """``keys + attn(keys_pe, tokens, tokens)`` for per-prompt image tokens (``B x HW x C``)
    with the image-query projection folded into the ~7 token keys: the score of image token
    ``x`` and token ``t`` in head ``h`` is ``(W_q,h x + b_q,h) . k_{h,t}`` =
    ``x . (W_q,h^T k_{h,t}) + b_q,h . k_{h,t}``, so the image side is one ``HW x C @ C x H*T``
    product per prompt instead of the ``HW x C x C'`` query projection. The output projection
    is folded into the token values as in ``_image_to_token_residual``."""
    B, T, C = tok_k.shape
    H, c1 = attn.num_heads, attn.internal_dim
    d = c1 // H
    n = keys.shape[1]
    k = attn.k_proj(tok_k).reshape(B, T, H, d) * (d ** -0.5)
    a = torch.einsum("bthd,hdc->bhtc", k, attn.q_proj.weight.reshape(H, d, C)).reshape(
        B, H * T, C)
    bias = torch.einsum("bthd,hd->bht", k, attn.q_proj.bias.reshape(H, d)).reshape(B, H * T, 1)
    scores = torch.baddbmm(bias, a, keys_pe.transpose(1, 2))          # B x HT x HW
    # softmax over the T tokens with the HW image tokens contiguous (see above)
    p = scores.reshape(B, H, T, n).softmax(2).reshape(B, H * T, n)
    v = attn.v_proj(tok_v).reshape(B, T, H, d)
    u = torch.einsum("bthd,chd->bhtc", v, attn.out_proj.weight.reshape(-1, H, d)).reshape(
        B, H * T, -1)
    # each head's probabilities sum to 1 over its T tokens, so the output bias spread as b / H
    # over every token row is added exactly once per image token: saves a B x HW x C pass
    u = u + attn.out_proj.bias / H
    return torch.baddbmm(keys, p.transpose(1, 2), u)


def _fold_pays(attn: DownsampledAttention, T) -> bool:
    """Folding beats projecting the image while the folded rows (2 H T: token -> image scores
    and values, plus H T image -> token scores) stay under the 3 C' projected channels; T is a
    SymInt while exporting (dynamic point count): fold there, the usual few-point case."""
    if not isinstance(T, int):
        return True
    return 3 * attn.num_heads * T < 3 * attn.internal_dim


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, *, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = DownsampledAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DownsampledAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act="relu")
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DownsampledAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``queries: B x T x C`` tokens, ``keys: B x HW x C`` image (or ``1 x HW x C`` shared by
        all B prompts: the result is then ``B x HW x C``); PEs of the same shapes (key_pe may
        have batch 1)."""
        if not self.training and keys.shape[0] == 1 and queries.shape[0] > 1:
            return self._forward_shared_image(queries, keys, query_pe, key_pe)
        if not self.training and keys.shape[0] == queries.shape[0] and keys.shape[0] > 1:
            if _fold_pays(self.cross_attn_token_to_image, queries.shape[1]):
                return self._forward_folded(queries, keys, query_pe, key_pe)
            return self._forward_stacked_proj(queries, keys, query_pe, key_pe)
        if self.skip_first_layer_pe:
            # segment-anything replaces (not adds to) the tokens here: no residual
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys

    # ---------------------------------------------------------------- inference fast paths
    # Same maths as ``forward`` (float rounding only: products are regrouped), for inference.
    # Automatic mask generation decodes 64 prompts against one image: segment-anything repeats
    # the image embedding per prompt, so every image-side projection runs 64 times.
    def _self_and_mlp_in(self, queries, query_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)

    def _forward_shared_image(self, queries, keys, query_pe, key_pe):
        """keys ``1 x HW x C`` shared by B prompts: the image-side projections of the
        token -> image attention (k of keys+pe, v of keys) and the query projection of the
        image -> token attention run once per image instead of once per prompt, and the
        token -> image attention runs once with all B*T tokens as queries (softmax is per query
        row, so batching the queries changes nothing)."""
        B, T, _ = queries.shape
        queries = self._self_and_mlp_in(queries, query_pe)
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        kp = keys + key_pe                                           # 1 x HW x C, once
        H = t2i.num_heads
        qh = t2i.q_proj(queries + query_pe)                          # B x T x C'
        d = qh.shape[-1] // H
        qh = qh.reshape(1, B * T, H, d).transpose(1, 2)              # 1 x H x BT x d
        out = attention(qh, t2i._heads(t2i.k_proj(kp)), t2i._heads(t2i.v_proj(keys)))
        out = t2i.out_proj(out.transpose(1, 2).reshape(B, T, t2i.internal_dim))
        queries = self.norm2(queries + out)

        queries = self.norm3(queries + self.mlp(queries))

        # image -> token: the image queries' projection once (1 x HW x C')
        keys = self.norm4(_image_to_token_residual(i2t, keys, i2t.q_proj(kp),
                                                   queries + query_pe, queries))
        return queries, keys

    def _forward_folded(self, queries, keys, query_pe, key_pe):
        """keys ``B x HW x C`` (one per prompt, the second block's case): no image-side
        projection at all. Both cross attentions score the image through ~7 folded token rows
        per head (``_fold_token_queries``, ``_image_to_token_from_image``) and the token ->
        image values are summed before their projection (``_token_to_image_out``): per prompt
        ``HW x C x 3 H T`` products (84 channels on shapes-sam, 168 on sam_vit_b) instead of
        ``HW x C x 3 C'`` (192 / 384), and no ``B x HW x 3C'`` intermediate."""
        queries = self._self_and_mlp_in(queries, query_pe)
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        T = queries.shape[1]
        kp = keys + key_pe                                           # B x HW x C
        a = _fold_token_queries(t2i, queries + query_pe)             # B x HT x C
        p = torch.bmm(a, kp.transpose(1, 2)).softmax(-1)             # B x HT x HW
        queries = self.norm2(queries + _token_to_image_out(t2i, p, keys, T))

        queries = self.norm3(queries + self.mlp(queries))

        keys = self.norm4(_image_to_token_from_image(i2t, keys, kp, queries + query_pe, queries))
        return queries, keys

    def _forward_stacked_proj(self, queries, keys, query_pe, key_pe):
        """keys ``B x HW x C`` (one per prompt): keys are not updated between the two cross
        attentions, so the three image-side projections (token -> image k of keys+pe and v of
        keys, image -> token q of keys+pe) are one ``B*HW x C @ C x 3C'`` GEMM on keys; the pe
        part ``W pe + b`` has batch 1 and is computed once. Saves the two ``B x HW x C`` adds
        of ``keys + key_pe`` and two GEMM launches over the largest operand."""
        queries = self._self_and_mlp_in(queries, query_pe)
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        w = torch.cat([t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight])
        c1 = t2i.internal_dim
        # the batch-1 part: W_k pe + b_k | b_v | W_q pe + b_q, added in place in one pass
        pe_part = torch.cat([t2i.k_proj(key_pe),
                             t2i.v_proj.bias.expand(key_pe.shape[0], key_pe.shape[1], -1),
                             i2t.q_proj(key_pe)], dim=-1)
        proj = torch.matmul(keys, w.t()).add_(pe_part)              # B x HW x 3C'
        k, v, img_q = proj[..., :c1], proj[..., c1:2 * c1], proj[..., 2 * c1:]

        out = attention(t2i._heads(t2i.q_proj(queries + query_pe)), t2i._heads(k), t2i._heads(v))
        b, _, n, _ = out.shape
        queries = self.norm2(queries + t2i.out_proj(out.transpose(1, 2).reshape(b, n, c1)))

        queries = self.norm3(queries + self.mlp(queries))

        keys = self.norm4(_image_to_token_residual(i2t, keys, img_q, queries + query_pe,
                                                   queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Args: depth (2 officially), embedding_dim (256), num_heads (8), mlp_dim (2048),
    attention_downsample_rate (2)."""

    def __init__(self, *, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim=embedding_dim, num_heads=num_heads, mlp_dim=mlp_dim,
                                 attention_downsample_rate=attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = DownsampledAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embedding: ``B x C x h x w`` (or ``1 x C x h x w`` shared by the B prompts).
            image_pe: ``B x C x h x w`` positional encoding (or batch 1, broadcast).
            point_embedding: ``B x T x C`` output + prompt tokens.
        Returns:
            processed tokens ``B x T x C`` and image tokens ``B x hw x C``.
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        q = queries + point_embedding
        fin = self.final_attn_token_to_image
        if not self.training and keys.shape[0] > 1 and _fold_pays(fin, q.shape[1]):
            # per-prompt image tokens: k / v projections folded into the T token queries
            p = torch.bmm(_fold_token_queries(fin, q), (keys + key_pe).transpose(1, 2))
            out = _token_to_image_out(fin, p.softmax(-1), keys, q.shape[1])
        elif not self.training and keys.shape[0] > 1:
            # k of keys+pe and v of keys in one GEMM over keys; the pe part once (batch 1)
            c1 = fin.internal_dim
            pe_part = torch.cat([fin.k_proj(key_pe),
                                 fin.v_proj.bias.expand(key_pe.shape[0], key_pe.shape[1], -1)], -1)
            proj = torch.matmul(keys, torch.cat([fin.k_proj.weight, fin.v_proj.weight]).t())
            proj.add_(pe_part)
            out = attention(fin._heads(fin.q_proj(q)), fin._heads(proj[..., :c1]),
                            fin._heads(proj[..., c1:]))
            b, _, n, _ = out.shape
            out = fin.out_proj(out.transpose(1, 2).reshape(b, n, c1))
        else:
            out = fin(q, keys + key_pe, keys)
        queries = self.norm_final_attn(queries + out)
        return queries, keys
