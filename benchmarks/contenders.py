"""The contenders, built at op level ``(B, H, L, D)`` or layer level ``(B, L, d_model)``.

Axes: B batch, H heads, L length, D head dim, N blocks (L / W), W block size, C d_model.

Every builder returns ``(fn, inputs)``: ``fn()`` runs the forward and returns the output,
``inputs`` are the leaf tensors a backward differentiates with respect to.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from sparse_sinkhorn.nn import SinkhornSelfAttention
from sparse_sinkhorn.ops import (
    dense_attention,
    local_attention,
    sinkhorn_attention,
    sparse_attention,
    topk_block_attention,
)

PEER = "peer"  # PyPI sinkhorn-transformer==0.11.4, Gumbel-Sinkhorn path
CONTENDERS = (
    "sinkhorn",  # soft Sinkhorn, local + sorted block
    "sinkhorn_hard",  # straight-through hard routing
    "sinkhorn_causal",  # causal Sinkhorn balancing
    "sortcut",  # SortCut 2 x b (n_sortcut=2)
    "mixture",  # Sinkhorn + dense SDPA
    "dense_sdpa",  # F.scaled_dot_product_attention
    "dense_materialised",  # softmax(QK^T)V, the (L x L) matrix in memory (the paper's baseline)
    "local",  # own block only
    "sparse",  # Sparse Transformer "fixed", emulated with an (L x L) mask
    "topk_causal",  # per-token routing, Quest's bound, 1 block, causal (the project's kernel)
    PEER,
)
# The same routing through FlexAttention: its backward needs CUDA (torch 2.13 has none on CPU)
CUDA_ONLY = ("topk_flex_causal",)
# contender -> FlexAttention or the project's grouped kernel (`topk_block_attention`'s backend)
TOPK = {"topk_causal": "grouped", "topk_flex_causal": "flex"}
# O(L^2) time (topk: its gate scores every block for every query, L x L/W)
QUADRATIC = ("mixture", "dense_sdpa", "dense_materialised", "sparse", "topk_causal")


@dataclass(frozen=True)
class Sizes:
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    block: int = 64

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim


Case = tuple[Callable[[], Tensor], list[Tensor]]


def peer_available() -> bool:
    return importlib.util.find_spec("sinkhorn_transformer") is not None


def _sinkhorn_kwargs(name: str) -> dict[str, object]:
    return {
        "sinkhorn": {},
        "sinkhorn_hard": {"hard": True},
        "sinkhorn_causal": {"is_causal": True},
        "sortcut": {"n_sortcut": 2},
        "mixture": {"mixture": True},
    }[name]


def _materialised(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = torch.einsum("bhld,bhsd->bhls", q, k) * q.shape[-1] ** -0.5  # (B, H, L, L)
    return torch.einsum("bhls,bhsd->bhld", scores.softmax(dim=-1), v)


def op_case(name: str, length: int, sz: Sizes, device: str, dtype: torch.dtype) -> Case:
    """Op-level inputs ``(B, H, L, D)`` (and ``(B, H, N, N)`` sort logits) and the call."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (sz.batch, sz.heads, length, sz.head_dim)
    q, k, v = (
        torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    )
    w = sz.block
    if name in ("sinkhorn", "sinkhorn_hard", "sinkhorn_causal", "sortcut", "mixture"):
        n = -(-length // w)
        logits = torch.randn(sz.batch, sz.heads, n, n, generator=g, device=device, dtype=dtype)
        logits.requires_grad_()
        kw = _sinkhorn_kwargs(name)
        return (lambda: sinkhorn_attention(q, k, v, logits, block_size=w, **kw)), [  # type: ignore[arg-type, return-value]
            q,
            k,
            v,
            logits,
        ]
    fns: dict[str, Callable[[], Tensor]] = {
        "dense_sdpa": lambda: dense_attention(q, k, v),
        "dense_materialised": lambda: _materialised(q, k, v),
        "local": lambda: local_attention(q, k, v, block_size=w),
        "sparse": lambda: sparse_attention(q, k, v, block_size=w),
    }
    for topk, backend in TOPK.items():
        fns[topk] = partial(
            topk_block_attention, q, k, v, block_size=w, top_k=1, is_causal=True, gate="bound",
            backend=backend,
        )  # fmt: skip
    if name == PEER:
        from sinkhorn_transformer.sinkhorn_transformer import SinkhornAttention

        attn = SinkhornAttention(w, sz.d_model, sz.head_dim, sz.heads, length, **_peer_flags()).to(
            device, dtype
        )
        fns[PEER] = lambda: attn(q, k, v)
    return fns[name], [q, k, v]


def _peer_flags() -> dict[str, object]:
    # non_permutative=True (differentiable top-k routing, not Sinkhorn) is the peer's default;
    # False selects its Gumbel-Sinkhorn path. Its layer default is sinkhorn_iter=5.
    return {"non_permutative": False, "sinkhorn_iter": 8, "temperature": 0.75}


def layer_case(name: str, length: int, sz: Sizes, device: str, dtype: torch.dtype) -> Case:
    """One full self-attention layer (projections included) on ``(B, L, C)``."""
    torch.manual_seed(0)
    c, w = sz.d_model, sz.block
    layer: torch.nn.Module
    if name == PEER:
        from sinkhorn_transformer import SinkhornSelfAttention as PeerLayer

        layer = PeerLayer(c, w, length, heads=sz.heads, **_peer_flags())  # type: ignore[arg-type]
    elif name == "dense_materialised":
        layer = _MaterialisedLayer(c, sz.heads)
    else:
        kind, kw = _LAYER_KINDS[name]
        layer = SinkhornSelfAttention(c, sz.heads, kind=kind, block_size=w, max_len=length, **kw)
    layer = layer.to(device, dtype).train()
    x = torch.randn(sz.batch, length, c, device=device, dtype=dtype, requires_grad=True)
    return (lambda: layer(x)), [x]


# Our layer: contender -> (attention kind, extra constructor keywords).
_LAYER_KINDS: dict[str, tuple[str, dict[str, object]]] = {
    "sinkhorn": ("sinkhorn", {}),
    "sinkhorn_hard": ("sinkhorn", {"hard": True}),
    "sinkhorn_causal": ("sinkhorn", {"causal": True}),
    "sortcut": ("sinkhorn", {"n_sortcut": 2}),
    "mixture": ("mixture", {}),
    "dense_sdpa": ("dense", {}),
    "local": ("local", {}),
    "sparse": ("sparse", {}),
    **{name: ("topk", {"causal": True, "gate": "bound", "backend": b}) for name, b in TOPK.items()},
}


class _MaterialisedLayer(torch.nn.Module):
    """Dense layer with an explicit ``softmax(QK^T)V`` (same projections as ours)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.out = torch.nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        from einops import rearrange

        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.heads)
        return self.out(rearrange(_materialised(q, k, v), "b h l e -> b l (h e)"))


def build(level: str, name: str, length: int, sz: Sizes, device: str, dtype: torch.dtype) -> Case:
    if level == "op":
        return op_case(name, length, sz, device, dtype)
    if level == "layer":
        return layer_case(name, length, sz, device, dtype)
    raise ValueError(f"level must be 'op' or 'layer', got {level!r}")
