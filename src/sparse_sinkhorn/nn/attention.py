"""Attention modules: Sinkhorn self-attention (with the baselines behind one switch) and
dense cross-attention. Modules own weights; the maths lives in `sparse_sinkhorn.ops`.

Axes: B batch, L length, S memory length, D model dim, H heads, E head dim, N blocks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from ..ops import SinkhornPlan, block_attention_mass, dense_attention
from ..ops.validate import check_layer_input
from .cache import AttentionCache
from .config import AttentionConfig
from .kinds import KINDS, Call
from .routing import Routing
from .sortnet import PROJECTED, SortNet


def check_sizes(d_model: int, n_heads: int, dropout: float) -> None:
    """Positive int width and heads, heads dividing the width, dropout in [0, 1)."""
    for name, value in (("d_model", d_model), ("n_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if d_model % n_heads != 0:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    ok = isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
    if not ok or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


class _Routed(NamedTuple):
    """What `SinkhornSelfAttention.attend` returns."""

    out: Tensor  # (B, L, D)
    plan: SinkhornPlan | None
    logits: Tensor | None  # (B, H, N, N): the sort logits it routed by


class SinkhornSelfAttention(nn.Module):
    """Multi-head self-attention with Sparse Sinkhorn attention or a baseline.

    ``config`` (an [`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig]) says how it attends; or
    give its fields as
    keywords (``kind="dense"``, ``block_size=64``, ...). The kinds: ``"sinkhorn"`` (local +
    sorted blocks), ``"mixture"`` (sinkhorn + dense), ``"dense"``, ``"local"``, ``"sparse"`` (Sparse
    Transformer) or ``"topk"`` (own block + the ``top_k`` blocks MoBA's parameter-free gate
    picks). The sort net reads masked block summaries of the layer input; in a causal layer
    the query side uses leak-free prefix summaries (docs/method.md §5), so the layer is
    exactly causal. Gumbel noise and dropout apply in training mode only.

    Args:
        d_model: model width ``D``; must be divisible by ``n_heads``.
        n_heads: heads ``H``.
        causal: decoder self-attention.
        dropout: attention-weight dropout (training only).
        bias: biases in the projections.
        config: the attention configuration (then no field keywords).
        routing: the [`Routing`][sparse_sinkhorn.nn.Routing] of the stack this layer is in
            (default: the configuration's, for a layer on its own); with ``index``, it says
            whether the layer owns a sort net (`Routing.has_sort_net`: not a later layer
            under ``shared_routing="layers"``, which routes by the first layer's logits,
            given to `forward` as ``logits``).
        index: the layer's place in its stack (0 = the first).

    Shapes: ``x`` ``(B, L, D)`` with any ``L <= max_len`` (any ``L`` for ``bilinear``),
    ``key_padding_mask`` ``(B, L)`` bool (True = real token) -> ``(B, L, D)``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        config: AttentionConfig | None = None,
        routing: Routing | None = None,
        index: int = 0,
        **fields: Any,
    ) -> None:
        super().__init__()
        check_sizes(d_model, n_heads, dropout)
        if config is None:
            config = AttentionConfig(**fields)
        elif fields:
            raise TypeError("give either config=AttentionConfig(...) or its fields, not both")
        self.config = config
        if causal and self.config.n_sortcut is not None:
            raise ValueError(
                "SortCut (n_sortcut) is for encoders only; it cannot be causal (a decoder, "
                "a LanguageModel or the decoder of a Seq2Seq)"
            )
        if self.config.backend == "flex" and dropout > 0.0:
            raise ValueError(
                f"backend='flex' has no attention dropout, got dropout={dropout}: build the "
                "layer (or the model's config) with dropout=0.0, or use backend='grouped'"
            )
        self.d_model, self.n_heads, self.causal, self.dropout = d_model, n_heads, causal, dropout
        # Queries, keys and values; with ``share_kv`` the keys double as values.
        self.qkv = nn.Linear(d_model, (2 if self.config.share_kv else 3) * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.sort_net: SortNet | None = None
        # the routing distillation loss of the last training forward (config.routing_loss > 0)
        self.routing_aux: Tensor | None = None
        if routing is None:
            routing = Routing.from_config(self.config)
        routing.check(self.config)
        if self.config.uses_sorting and routing.has_sort_net(index):
            self.sort_net = SortNet.from_config(d_model, n_heads, self.config)
        # the op's options, built once per mode (eval, training); causal is the layer's
        self._options = {
            training: self.config.op_options(
                is_causal=causal, training=training, dropout_p=dropout if training else 0.0
            )
            for training in (False, True)
            if self.config.uses_sorting
        }

    @classmethod
    def from_config(
        cls, d_model: int, n_heads: int, config: AttentionConfig, **kwargs: Any
    ) -> SinkhornSelfAttention:
        """``cls(d_model, n_heads, config=config, **kwargs)``."""
        return cls(d_model, n_heads, config=config, **kwargs)

    def sort_logits(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``(B, H, N, N)`` routing logits from the layer input ``x`` ``(B, L, D)`` (the
        one place a forward takes them from; ``sort_net="qk"``/``"qk-bound"`` project ``x``
        again)."""
        if self.sort_net is None:
            raise ValueError(
                "this layer has no sort net (a baseline kind, or a later layer under "
                "shared_routing='layers', which routes by the first layer's logits)"
            )
        return self.sort_net.route(
            self._routing_input(x), causal=self.causal, key_padding_mask=key_padding_mask
        )

    def _routing_input(self, x: Tensor, projected: Tensor | None = None) -> Tensor:
        """What the sort net summarises: the layer input ``x``, or the layer's projected
        ``[Q | K]`` ``(B, L, 2D)`` (``sort_net="qk"``; ``[Q | K | -Q | -K]`` for
        ``"qk-bound"``); ``projected``: ``self.qkv(x)``, when the caller has it."""
        parts = PROJECTED.get(self.config.sort_net)
        if parts is None:
            return x
        projected = self.qkv(x) if projected is None else projected
        qk = projected[..., : 2 * self.d_model]
        return qk if parts == 2 else torch.cat([qk, -qk], dim=-1)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        return_plan: bool = False,
        generator: torch.Generator | None = None,
        cache: AttentionCache | None = None,
        logits: Tensor | None = None,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, SinkhornPlan | None] | _Routed:
        """``x`` ``(B, L, D)`` -> ``(B, L, D)`` (and the plan if ``return_plan``).

        ``logits``: ``(B, H, N, N)`` sort logits to route by instead of this layer's own
        (``shared_routing="layers"``: the first layer's, for every layer of the stack).
        ``return_logits``: return ``(out, plan, logits)``, the sort logits it routed by
        (None for a kind without routing, or a step of a filled cache; `attend`).

        With ``cache`` (incremental decoding, eval mode, causal layers, no padding mask), ``x``
        holds the *new* positions only: an empty cache runs the full forward on them and
        keeps its state; a filled one attends from them one at a time. Either way the output
        equals the full causal forward of the whole sequence at those positions.
        """
        check_layer_input(x, key_padding_mask, d_model=self.d_model, weight=self.qkv.weight)
        if logits is not None and not self.config.uses_sorting:
            raise ValueError(f"logits= is for sinkhorn/mixture layers, not {self.config.kind!r}")
        n_proj = self.qkv.out_features // self.d_model  # 3, or 2 with share_kv
        projected = self.qkv(x)
        parts = _SplitHeads.apply(projected, n_proj, self.n_heads)  # n_proj x (B, H, L, E)
        q, k, v = parts if len(parts) == 3 else (parts[0], parts[1], parts[1])
        if cache is None:
            out, plan, logits = self._attend(q, k, v, x, key_padding_mask, generator, logits)
        else:
            self._check_cache_use(key_padding_mask)
            routed_by = self._routing_input(x, projected)  # what the cache summarises
            if cache.length == 0:
                out, plan, logits = self._attend(q, k, v, x, None, None, logits)
                cache.prefill(k, v, routed_by, self.config, self.sort_net)
            else:
                if logits is not None:
                    raise ValueError(
                        "logits= is for full forwards; a filled cache routes each new block "
                        "itself (from the first layer's cache under shared_routing='layers')"
                    )
                out, plan = cache.step(q, k, v, routed_by), None
        y = self.out(rearrange(out, "b h l e -> b l (h e)"))  # (B, L, D)
        if return_logits:
            return _Routed(y, plan, logits)
        return (y, plan) if return_plan else y

    def attend(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        cache: AttentionCache | None = None,
        logits: Tensor | None = None,
    ) -> _Routed:
        """``self(x, ..., return_logits=True)`` (hooks run), typed: ``(out, plan, logits)``,
        the sort logits being what a stack hands its later layers under
        ``shared_routing="layers"``."""
        routed = self(x, key_padding_mask, cache=cache, logits=logits, return_logits=True)
        assert isinstance(routed, _Routed)
        return routed

    def _check_cache_use(self, key_padding_mask: Tensor | None) -> None:
        if not self.causal:
            raise ValueError("a decoding cache needs a causal (decoder) self-attention layer")
        if self.training:
            raise ValueError("incremental decoding is for eval mode only; call model.eval()")
        if key_padding_mask is not None:
            raise ValueError("incremental decoding takes no key_padding_mask (no padding)")

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        x: Tensor,
        mask: Tensor | None,
        generator: torch.Generator | None,
        logits: Tensor | None = None,
    ) -> tuple[Tensor, SinkhornPlan | None, Tensor | None]:
        cfg = self.config
        kind = KINDS[cfg.kind]
        p = self.dropout if self.training else 0.0
        options = None
        if kind.routes:
            if self.training and cfg.routing_loss > 0:
                self.routing_aux = cfg.routing_loss * self._routing_distillation(q, k, x, mask)
            if logits is None:
                logits = self.sort_logits(x, mask)
            options = self._options[self.training]
        call = Call(self.causal, mask, p, self.training, logits, generator, options)
        out, plan = kind.attend(cfg, q, k, v, call)
        return out, plan, logits

    def _routing_distillation(self, q: Tensor, k: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        """KL from the layer's own dense block attention mass (the teacher, no gradient) to
        each sort-net row's softmax over the blocks it may take (earlier blocks when causal),
        averaged over rows that have a target. Only the sort net learns from it: the
        teacher is detached and the student reads a detached copy of ``x``."""
        cfg = self.config
        assert self.sort_net is not None
        target = block_attention_mass(
            q,
            k,
            block_size=cfg.block_size,
            is_causal=self.causal,
            key_padding_mask=mask,
            reduce=cfg.routing_teacher,
        )  # (B, H, N, N)
        n = target.shape[-1]
        allowed = torch.ones(n, n, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = allowed.tril(-1)  # strictly earlier blocks
        target = target * allowed
        total = target.sum(-1, keepdim=True)  # (B, H, N, 1)
        has = total[..., 0] > 0  # rows with a target (not causal row 0, not padding)
        target = target / total.clamp_min(1e-12)
        student = self.sort_net.route(x.detach(), causal=self.causal, key_padding_mask=mask).float()
        log_p = student.masked_fill(~allowed, -1e9).log_softmax(-1)  # finite: row 0 stays so
        kl = (target * (target.clamp_min(1e-12).log() - log_p)).sum(-1)  # (B, H, N)
        return (kl * has).sum() / has.sum().clamp_min(1)


def routing_losses(model: nn.Module) -> Tensor | None:
    """The sum of every Sinkhorn layer's routing distillation loss from the last training
    forward (``AttentionConfig.routing_loss``), cleared as it is read; None when no layer has
    one. Add it to the task loss."""
    total: Tensor | None = None
    for module in model.modules():
        if isinstance(module, SinkhornSelfAttention) and module.routing_aux is not None:
            total = module.routing_aux if total is None else total + module.routing_aux
            module.routing_aux = None
    return total


class _SplitHeads(torch.autograd.Function):
    """``(B, L, n*H*E)`` projections -> ``n`` per-head views ``(B, H, L, E)`` (no copy).

    The backward writes the ``n`` head gradients straight into one ``(B, L, n, H, E)``
    buffer, the layout the projection's backward reads: one copy, where ``unbind`` of a
    rearranged view costs two (a stack, then a transposing copy).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, n: int, heads: int) -> tuple[Tensor, ...]:
        b, length, _ = x.shape
        view = x.view(b, length, n, heads, -1)  # (B, L, n, H, E)
        ctx.n = n
        return tuple(view[:, :, i].transpose(1, 2) for i in range(n))  # n x (B, H, L, E)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor, None, None]:
        ref = next(g for g in grads if g is not None)
        parts = [
            (torch.zeros_like(ref) if g is None else g).transpose(1, 2) for g in grads
        ]  # n x (B, L, H, E)
        out = torch.stack(parts, dim=2)  # (B, L, n, H, E)
        return out.view(out.shape[0], out.shape[1], -1), None, None


class CrossAttention(nn.Module):
    """Dense multi-head attention from ``x`` ``(B, L, D)`` to ``memory`` ``(B, S, D)``,
    with its own query and key/value projections."""

    def __init__(
        self, d_model: int, n_heads: int, *, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        check_sizes(d_model, n_heads, dropout)
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self, x: Tensor, memory: Tensor, memory_padding_mask: Tensor | None = None
    ) -> Tensor:
        q = rearrange(self.q(x), "b l (h e) -> b h l e", h=self.n_heads)
        k, v = rearrange(self.kv(memory), "b s (two h e) -> two b h s e", two=2, h=self.n_heads)
        out = dense_attention(
            q,
            k,
            v,
            key_padding_mask=memory_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, E)
        return self.out(rearrange(out, "b h l e -> b l (h e)"))
