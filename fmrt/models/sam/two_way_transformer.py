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

Factored image tokens (``forward(..., factored=True)``, used by the automatic mask generator):
with one image shared by B prompts the image tokens after the first block are
``LN(image + P U)``, P the image -> token attention's ``HW x H*T`` probabilities and U its
``H*T x C`` projected token values: a shared image plus a rank-``H*T`` per-prompt update, and
LayerNorm keeps that form (``FactoredImageTokens``, ``_factored_add_layer_norm``). Later blocks,
the final attention and the mask head's first GEMM read the tokens only through products, so
no ``B x HW x C`` tensor is formed: the shared parts are projected once per call and each
prompt costs K-wide products (K = 58 of C = 128 on shapes-sam). Float rounding only: decoder
outputs within ~3e-5 of a float64 reference on shapes-sam (logits up to ~80), as the per-prompt
paths above. AMG decoder CPU time per 64 prompts (sum of per-op minima, one batch): 46-52 ms
-> 34-38 ms, with ``MaskDecoder.upscale_tokens`` for the mask head.

Parameter names match segment-anything's ``TwoWayTransformer``.
"""
from __future__ import annotations

from typing import Optional, Tuple

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
        p = _shared_image_to_token_probs(k, q[0])                       # B x H x T x HW
    else:
        scores = torch.matmul(k.transpose(1, 2), q.permute(0, 2, 3, 1))  # B x H x T x HW
        p = scores.softmax(2)
    p = p.reshape(B, H * T, n)
    return torch.baddbmm((keys + attn.out_proj.bias).expand(B, -1, -1), p.transpose(1, 2), u)


def _shared_image_to_token_probs(k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Image -> token probabilities for image queries shared by all prompts: ``k`` ``B x T x
    H x d`` projected token keys, ``q`` ``HW x H x d`` projected, pre-scaled image queries.
    One ``B*T x d @ d x HW`` product per head for all prompts; returns ``B x H x T x HW``
    (softmax over T, see ``_image_to_token_residual``)."""
    B, T, H, d = k.shape
    n = q.shape[0]
    scores = torch.matmul(k.permute(2, 0, 1, 3).reshape(H, B * T, d),
                          q.permute(1, 2, 0))                           # H x BT x HW
    return scores.reshape(H, B, T, n).softmax(2).transpose(0, 1)


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
    return _project_weighted_values(attn, torch.bmm(p, values), T)


def _project_weighted_values(attn: DownsampledAttention, pv: torch.Tensor, T: int
                             ) -> torch.Tensor:
    """``_token_to_image_out`` after the weighted sum: ``pv`` (``B x H*T x C``) holds
    ``sum_x p_{h,t}(x) v(x)`` of un-projected image values; returns ``B x T x C``."""
    B, _, C = pv.shape
    H, c1 = attn.num_heads, attn.internal_dim
    d = c1 // H
    v = torch.einsum("bhtc,hdc->bthd", pv.reshape(B, H, T, C),
                     attn.v_proj.weight.reshape(H, d, C)).reshape(B, T, c1)
    return attn.out_proj(v + attn.v_proj.bias)


def _fold_token_keys(attn: DownsampledAttention, tok_k: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token keys with the image-query projection folded in (inference fast path).

    ``tok_k``: ``B x T x C`` un-projected token keys. Returns (``a``: ``B x H*T x C``,
    ``bias``: ``B x H*T x 1``) such that the scaled score of image token ``x`` (un-projected,
    ``C`` wide) against token ``t`` in head ``h`` is ``a[h*T + t] . x + bias[h*T + t]``:
    ``(W_q,h x + b_q,h) . k_{h,t} = x . (W_q,h^T k_{h,t}) + b_q,h . k_{h,t}``."""
    B, T, C = tok_k.shape
    H, c1 = attn.num_heads, attn.internal_dim
    d = c1 // H
    k = attn.k_proj(tok_k).reshape(B, T, H, d) * (d ** -0.5)
    a = torch.einsum("bthd,hdc->bhtc", k, attn.q_proj.weight.reshape(H, d, C)).reshape(
        B, H * T, C)
    bias = torch.einsum("bthd,hd->bht", k, attn.q_proj.bias.reshape(H, d)).reshape(B, H * T, 1)
    return a, bias


def _fold_token_values(attn: DownsampledAttention, tok_v: torch.Tensor) -> torch.Tensor:
    """Token values with the output projection (and its bias) folded in: ``B x H*T x C`` rows
    ``u`` such that ``attn(image queries, tokens, tokens)`` at image token ``x`` is
    ``sum_r p[r, x] u[r]`` for the per-head probabilities ``p`` over the T tokens. Each head's
    probabilities sum to 1, so the output bias spread as ``b / H`` over every row is added
    exactly once per image token."""
    B, T, _ = tok_v.shape
    H, c1 = attn.num_heads, attn.internal_dim
    d = c1 // H
    v = attn.v_proj(tok_v).reshape(B, T, H, d)
    u = torch.einsum("bthd,chd->bhtc", v, attn.out_proj.weight.reshape(-1, H, d)).reshape(
        B, H * T, -1)
    return u + attn.out_proj.bias / H


def _image_to_token_from_image(attn: DownsampledAttention, keys: torch.Tensor,
                               keys_pe: torch.Tensor, tok_k: torch.Tensor,
                               tok_v: torch.Tensor) -> torch.Tensor:
    """``keys + attn(keys_pe, tokens, tokens)`` for per-prompt image tokens (``B x HW x C``)
    with the image-query projection folded into the ~7 token keys (``_fold_token_keys``): the
    image side is one ``HW x C @ C x H*T`` product per prompt instead of the ``HW x C x C'``
    query projection. The output projection is folded into the token values
    (``_fold_token_values``) as in ``_image_to_token_residual``."""
    B, T, C = tok_k.shape
    H = attn.num_heads
    n = keys.shape[1]
    a, bias = _fold_token_keys(attn, tok_k)
    scores = torch.baddbmm(bias, a, keys_pe.transpose(1, 2))          # B x HT x HW
    # softmax over the T tokens with the HW image tokens contiguous (see above)
    p = scores.reshape(B, H, T, n).softmax(2).reshape(B, H * T, n)
    return torch.baddbmm(keys, p.transpose(1, 2), _fold_token_values(attn, tok_v))


def _fold_pays(attn: DownsampledAttention, T) -> bool:
    """Folding beats projecting the image while the folded rows (2 H T: token -> image scores
    and values, plus H T image -> token scores) stay under the 3 C' projected channels; T is a
    SymInt while exporting (dynamic point count): fold there, the usual few-point case."""
    if not isinstance(T, int):
        return True
    return 3 * attn.num_heads * T < 3 * attn.internal_dim


# --------------------------------------------------------------------------- factored tokens
class FactoredImageTokens:
    """Per-prompt image tokens of B prompts on one image, never materialised (inference).

    Token ``x`` of prompt ``b`` is ``alpha[b, x] * base[x] + sum_k coef[b, k, x] * basis[b, k]``:
    ``base`` ``HW x C`` is shared by all prompts, ``alpha`` ``B x HW`` (None: 1), ``coef``
    ``B x K x HW`` and ``basis`` ``B x K x C`` (both None: K = 0). After the first block of the
    two-way transformer the tokens are ``LN(image + P U)`` with ``P`` the image -> token
    attention's ``HW x H*T`` probabilities and ``U`` its ``H*T x C`` projected token values, and
    a LayerNorm of that is again of this form (``_factored_add_layer_norm``), so K grows by
    ``H*T + 1`` per block (29 / 58 on shapes-sam, 57 / 114 on sam_vit_b with one point) and stays
    below C. Everything the attentions and the mask head need from the tokens is a product
    with a few token rows or a projection: the shared ``base`` is projected once per call,
    the per-prompt part costs ``K``-wide products (``_factored_head_scores``,
    ``_factored_token_to_image``, ``project``).
    """

    __slots__ = ("base", "alpha", "coef", "basis")

    def __init__(self, base: torch.Tensor, alpha: Optional[torch.Tensor] = None,
                 coef: Optional[torch.Tensor] = None, basis: Optional[torch.Tensor] = None
                 ) -> None:
        self.base, self.alpha, self.coef, self.basis = base, alpha, coef, basis

    @property
    def batch(self) -> int:
        for t in (self.alpha, self.coef):
            if t is not None:
                return t.shape[0]
        return 1

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.batch,) + tuple(self.base.shape)

    def select(self, rows: torch.Tensor) -> "FactoredImageTokens":
        """The tokens of the prompts ``rows`` (int64 indices), still factored."""
        def take(t):
            return None if t is None else t[rows]
        return FactoredImageTokens(self.base, take(self.alpha), take(self.coef), take(self.basis))

    def project(self, weight: torch.Tensor, bias: torch.Tensor,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tokens @ weight + bias`` (``weight`` ``C x N``, ``bias`` ``N``) of the prompts
        ``rows`` (None: all): ``B' x HW x N`` without forming the tokens, as
        ``alpha (base weight) + coef^T (basis weight) + bias``; the ``HW x C x N`` product runs
        once for all prompts and the per-prompt one is K (not C) deep."""
        def take(t):
            return t if t is None or rows is None else t[rows]
        alpha, coef, basis = take(self.alpha), take(self.coef), take(self.basis)
        n = self.batch if rows is None else int(rows.numel())
        bw = torch.addmm(bias, self.base, weight)                           # HW x N
        if alpha is None:
            out = bw.expand(n, -1, -1).contiguous()
        else:
            out = torch.addcmul(bias, alpha[:, :, None], torch.matmul(self.base, weight))
        if coef is not None:
            out.baddbmm_(coef.transpose(1, 2), torch.matmul(basis, weight))
        return out

    def materialize(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tokens ``B' x HW x C`` of the prompts ``rows`` (int64 indices; None: all)."""
        def take(t):
            return t if t is None or rows is None else t[rows]
        alpha, coef, basis = take(self.alpha), take(self.coef), take(self.basis)
        n = self.batch if rows is None else int(rows.numel())
        if alpha is None:
            out = self.base.expand(n, -1, -1).contiguous()
        else:
            out = alpha[:, :, None] * self.base
        if coef is not None:
            out.baddbmm_(coef.transpose(1, 2), basis)
        return out


def _factored_head_scores(z: FactoredImageTokens, q: torch.Tensor, weight: torch.Tensor,
                          pe: torch.Tensor) -> torch.Tensor:
    """Per-head scores ``q[b, t, h] . W_h (z[b, x] + pe[x])`` (``B x H x T x HW``) of token
    vectors ``q`` (``B x T x H x d``, pre-scaled) against the image tokens projected by
    ``weight`` (``C' x C``, no bias). The shared parts are projected once per call
    (``[base; pe] W^T``, ``2 HW x C x C'``), so each prompt's shared-part scores are ``T H``
    d-wide dot products per image token (not ``H T`` C-wide ones as when folding ``W`` into
    the tokens: 8x fewer products at d = C / 8); the per-prompt part is ``coef^T (basis W_h^T
    q)``, K wide."""
    B, T, H, d = q.shape
    n = z.base.shape[0]
    kk = torch.matmul(torch.cat([z.base, pe]), weight.t()).view(2 * n, H, d).permute(1, 2, 0)
    m = torch.bmm(q.permute(2, 0, 1, 3).reshape(H, B * T, d), kk).view(H, B, T, 2, n)
    m = m.transpose(0, 1)                                              # B x H x T x 2 x n view
    s = q.new_empty(B, H, T, n)
    if z.alpha is None:
        torch.add(m[:, :, :, 1], m[:, :, :, 0], out=s)
    else:
        torch.addcmul(m[:, :, :, 1], m[:, :, :, 0], z.alpha[:, None, None, :], out=s)
    if z.coef is not None:
        # the per-prompt part with W folded into the token rows (H T x C per prompt), which
        # costs H T C K per prompt against K C C' for projecting the basis instead
        C = weight.shape[1]
        a = torch.matmul(q.permute(2, 0, 1, 3).reshape(H, B * T, d), weight.view(H, d, C))
        a = a.view(H, B, T, C).transpose(0, 1).reshape(B, H * T, C)
        s.view(B, H * T, n).baddbmm_(torch.bmm(a, z.basis.transpose(1, 2)), z.coef)
    return s


def _factored_token_to_image(attn: DownsampledAttention, z: FactoredImageTokens,
                             tok_q: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """``attn(tok_q, z + pe, z)`` for factored image tokens: ``B x T x C``. Scores by
    ``_factored_head_scores`` (the key bias adds a constant per query row, which the softmax
    over the image cancels); the values ``sum_x p(x) (W_v z[x] + b_v)`` are
    ``(p alpha) (base W_v^T)`` per head (the shared values projected once) plus
    ``(p coef^T) (basis W_v^T)`` plus ``b_v`` (each row of ``p`` sums to 1)."""
    B, T, _ = tok_q.shape
    H, c1 = attn.num_heads, attn.internal_dim
    d = c1 // H
    n = z.base.shape[0]
    q = attn.q_proj(tok_q).view(B, T, H, d) * (d ** -0.5)
    p = _factored_head_scores(z, q, attn.k_proj.weight, pe).softmax(-1)   # B x H x T x HW
    pa = p.new_empty(H, B, T, n)
    if z.alpha is None:
        pa.copy_(p.transpose(0, 1))
    else:
        torch.mul(p.transpose(0, 1), z.alpha[None, :, None, :], out=pa)
    vb = torch.matmul(z.base, attn.v_proj.weight.t()).view(n, H, d).transpose(0, 1)
    o = torch.bmm(pa.view(H, B * T, n), vb)                            # H x BT x d
    if z.coef is not None:
        # sum_x p coef^T basis (K wide), then W_v per head on the H T sums
        pcb = torch.bmm(torch.bmm(p.view(B, H * T, n), z.coef.transpose(1, 2)), z.basis)
        o = o.baddbmm(pcb.view(B, H, T, -1).permute(1, 0, 2, 3).reshape(H, B * T, -1),
                      attn.v_proj.weight.view(H, d, -1).transpose(1, 2))
    o = o.view(H, B, T, d).permute(1, 2, 0, 3).reshape(B, T, c1)
    return attn.out_proj(o + attn.v_proj.bias)


def _factored_add_layer_norm(z: FactoredImageTokens, p: torch.Tensor, u: torch.Tensor,
                             norm: nn.LayerNorm) -> FactoredImageTokens:
    """``norm(z + p^T u)`` (``p`` ``B x R x HW``, ``u`` ``B x R x C``) in factored form.

    With ``y = alpha base + coef^T basis`` (``p`` / ``u`` appended to coef / basis), centring
    each row of ``base`` and ``basis`` over the channels centres ``y`` exactly, so
    ``y - mean(y) = alpha base_c + coef^T basis_c`` and the variance is its squared norm / C:
    ``alpha^2 |base_c|^2 + 2 alpha coef . (basis_c base_c^T) + coef^T (basis_c basis_c^T) coef``
    (a K deep ``B*K x C @ C x HW`` GEMM and a ``K x K`` Gram matrix per prompt; no ``mean^2``
    cancellation). The LayerNorm output ``gamma s (y - mean) + beta`` (``s = 1/sqrt(var + eps)``)
    is then ``(s alpha) (base_c gamma) + (s coef)^T (basis_c gamma) + 1 beta``: factored
    again, with K + 1 rows. (Forming the centred tokens in L2-sized chunks of prompts and
    reducing them instead was 25% faster alone but 7% slower inside the generator.)"""
    B, R, n = p.shape
    C = u.shape[-1]
    k0 = 0 if z.coef is None else z.coef.shape[1]
    K = k0 + R
    # the new coefficients, written once into their final buffer (plus the row of ones for
    # beta) and scaled in place below
    buf = p.new_empty(B, K + 1, n)
    if z.coef is not None:
        buf[:, :k0] = z.coef
    buf[:, k0:K] = p
    buf[:, K] = 1
    coef = buf[:, :K]
    if z.basis is None:
        basis_c = u - u.mean(-1, keepdim=True)
    else:
        basis_c = torch.cat([z.basis, u], 1)                            # B x K x C
        basis_c.sub_(basis_c.mean(-1, keepdim=True))
    base_c = z.base - z.base.mean(-1, keepdim=True)                     # HW x C
    gq = torch.matmul(basis_c.reshape(B * K, C), base_c.t()).view(B, K, n)
    gq.mul_(2 if z.alpha is None else 2 * z.alpha[:, None, :])
    gq.baddbmm_(torch.bmm(basis_c, basis_c.transpose(1, 2)), coef)
    sq = gq.mul_(coef).sum(1)                                           # B x HW
    n0 = base_c.pow(2).sum(-1)                                          # HW
    sq = sq.add_(n0) if z.alpha is None else sq.addcmul_(z.alpha.square(), n0)
    s = sq.div_(C).add_(norm.eps).rsqrt_()                              # B x HW
    alpha = s if z.alpha is None else s * z.alpha
    coef.mul_(s[:, None, :])
    basis = u.new_empty(B, K + 1, C)
    torch.mul(basis_c, norm.weight, out=basis[:, :K])
    basis[:, K] = norm.bias
    return FactoredImageTokens(base_c * norm.weight, alpha, buf, basis)


def _factoring_pays(depth: int, num_heads: int, T, C: int) -> bool:
    """Factored tokens carry K = depth (H T + 1) rows per prompt after the last block, and
    their per-prompt products are K wide where unfactored tokens' are C wide (plus ~6 passes
    over the ``B x HW x C`` tokens): factor while K <= C (one or a few points per prompt: 58
    of 128 on shapes-sam, 114 of 256 on sam_vit_b). Never while tracing / exporting (the
    exported graphs keep the plain path)."""
    if not isinstance(T, int) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return depth * (num_heads * T + 1) <= C


def _take_tokens(queries: torch.Tensor, pe: torch.Tensor, which
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``queries`` / ``pe`` (``B x T x C``) at ``which``: the first ``which`` tokens (int) or
    the listed token indices."""
    if isinstance(which, int):
        return queries[:, :which], pe[:, :which]
    idx = torch.as_tensor(list(which), dtype=torch.long, device=queries.device)
    return queries.index_select(1, idx), pe.index_select(1, idx)


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

    def _shared_token_to_image_and_mlp(self, queries, query_pe, keys, kp):
        """The token -> image attention (+ residual, norm2) and the MLP (+ residual, norm3)
        against one image ``keys`` ``1 x HW x C`` (``kp`` = keys + pe) shared by the B prompts
        of ``queries`` ``B x T x C``: the image-side k / v projections run once, and the
        attention once with all B*T tokens as queries (softmax is per query row)."""
        B, T, _ = queries.shape
        t2i = self.cross_attn_token_to_image
        H = t2i.num_heads
        qh = t2i.q_proj(queries + query_pe)                          # B x T x C'
        d = qh.shape[-1] // H
        qh = qh.reshape(1, B * T, H, d).transpose(1, 2)              # 1 x H x BT x d
        out = attention(qh, t2i._heads(t2i.k_proj(kp)), t2i._heads(t2i.v_proj(keys)))
        out = t2i.out_proj(out.transpose(1, 2).reshape(B, T, t2i.internal_dim))
        queries = self.norm2(queries + out)
        return self.norm3(queries + self.mlp(queries))

    def _forward_shared_image(self, queries, keys, query_pe, key_pe):
        """keys ``1 x HW x C`` shared by B prompts: the image-side projections of the
        token -> image attention (k of keys+pe, v of keys) and the query projection of the
        image -> token attention run once per image instead of once per prompt, and the
        token -> image attention runs once with all B*T tokens as queries (softmax is per query
        row, so batching the queries changes nothing)."""
        queries = self._self_and_mlp_in(queries, query_pe)
        i2t = self.cross_attn_image_to_token
        kp = keys + key_pe                                           # 1 x HW x C, once
        queries = self._shared_token_to_image_and_mlp(queries, query_pe, keys, kp)

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

    def forward_factored(self, queries: torch.Tensor, keys, query_pe: torch.Tensor,
                         key_pe: torch.Tensor) -> Tuple[torch.Tensor, FactoredImageTokens]:
        """Inference, B prompts on one image: ``keys`` is the shared image ``1 x HW x C`` (the
        first block) or the ``FactoredImageTokens`` of the previous block; ``key_pe``
        ``1 x HW x C``. Returns the tokens and this block's image tokens, factored: no
        ``B x HW x C`` tensor is formed (``FactoredImageTokens``). The first block is
        ``_forward_shared_image`` up to its last residual + LayerNorm; later blocks run both
        cross attentions on the factored tokens (``_factored_token_to_image``,
        ``_factored_head_scores``)."""
        B, T, _ = queries.shape
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        H = i2t.num_heads
        pe = key_pe[0]
        queries = self._self_and_mlp_in(queries, query_pe)
        if isinstance(keys, torch.Tensor):
            kp = keys + key_pe                                       # 1 x HW x C, once
            queries = self._shared_token_to_image_and_mlp(queries, query_pe, keys, kp)
            d = i2t.internal_dim // H
            k = i2t.k_proj(queries + query_pe).reshape(B, T, H, d)
            img_q = i2t.q_proj(kp[0]).reshape(-1, H, d) * (d ** -0.5)
            p = _shared_image_to_token_probs(k, img_q).reshape(B, H * T, -1)
            keys = FactoredImageTokens(keys[0])
        else:
            out = _factored_token_to_image(t2i, keys, queries + query_pe, pe)
            queries = self.norm2(queries + out)
            queries = self.norm3(queries + self.mlp(queries))
            # image -> token: the image queries W_q (z + pe) + b_q scored against the token
            # keys; the b_q . k term varies over the tokens, so it stays
            d = i2t.internal_dim // H
            k = i2t.k_proj(queries + query_pe).view(B, T, H, d) * (d ** -0.5)
            scores = _factored_head_scores(keys, k, i2t.q_proj.weight, pe)
            scores.add_(torch.einsum("bthd,hd->bht", k, i2t.q_proj.bias.view(H, d))[..., None])
            p = scores.softmax(2).view(B, H * T, -1)
        u = _fold_token_values(i2t, queries)
        return queries, _factored_add_layer_norm(keys, p, u, self.norm4)

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

    def can_factor(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                   point_embedding: torch.Tensor) -> bool:
        """Whether ``forward`` runs on factored image tokens (``FactoredImageTokens``):
        inference, one image and positional encoding shared by B > 1 prompts, and few enough
        tokens per prompt (``_factoring_pays``)."""
        B, T, C = point_embedding.shape
        return (not self.training and self.depth >= 1 and image_embedding.shape[0] == 1 and
                image_pe.shape[0] == 1 and isinstance(B, int) and B > 1 and
                _factoring_pays(self.depth, self.num_heads, T, C))

    def _forward_factored(self, keys: torch.Tensor, key_pe: torch.Tensor,
                          point_embedding: torch.Tensor, final_tokens=None
                          ) -> Tuple[torch.Tensor, FactoredImageTokens]:
        queries, z = point_embedding, keys
        for layer in self.layers:
            queries, z = layer.forward_factored(queries, z, point_embedding, key_pe)
        if final_tokens is not None:
            queries, point_embedding = _take_tokens(queries, point_embedding, final_tokens)
        out = _factored_token_to_image(self.final_attn_token_to_image, z,
                                       queries + point_embedding, key_pe[0])
        return self.norm_final_attn(queries + out), z

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor, factored: bool = False,
                final_tokens=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embedding: ``B x C x h x w`` (or ``1 x C x h x w`` shared by the B prompts).
            image_pe: ``B x C x h x w`` positional encoding (or batch 1, broadcast).
            point_embedding: ``B x T x C`` output + prompt tokens.
            factored: where ``can_factor``, return the image tokens as ``FactoredImageTokens``
                (``.materialize(rows)`` gives ``B' x hw x C``) instead of a tensor.
            final_tokens: run the final token -> image attention for the first
                ``final_tokens`` tokens only (an int), or for the tokens at the listed indices
                (a list of ints), and return just those, in that order (the mask decoder
                reads only its output tokens, not the prompt tokens; each token's row of that
                attention and LayerNorm is independent of the others, so the kept rows are
                unchanged). None: all T.
        Returns:
            processed tokens ``B x T x C`` (``B x T' x C`` with ``final_tokens``) and image
            tokens ``B x hw x C``.
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        if factored and self.can_factor(image_embedding, image_pe, point_embedding):
            return self._forward_factored(keys, key_pe, point_embedding, final_tokens)
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        if final_tokens is not None:
            queries, point_embedding = _take_tokens(queries, point_embedding, final_tokens)
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
