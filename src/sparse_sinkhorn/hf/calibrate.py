"""``hf.calibrate``: train only the sort nets of a converted model towards its dense attention."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import ATTN_IMPLEMENTATION, CONFIG_KEY


def calibrate(
    model: Any,
    batches: Iterable[Tensor | Mapping[str, Tensor]],
    *,
    lr: float = 1e-3,
) -> list[float]:
    """Train only the sort nets of a converted model to match its own dense attention.

    For each batch the model runs twice with the same weights: with ``sdpa`` (dense attention,
    the teacher; no gradient) and with Sinkhorn attention (the student); the loss is the KL
    divergence from the teacher's next-token distribution to the student's, averaged over the
    real (unmasked) positions, and AdamW updates the sort nets only. Every other weight is
    left bit-identical, so a pretrained model keeps its knowledge and its routing starts warm
    instead of random. The model is in eval mode while calibrating (no dropout, no Gumbel
    noise) and is given back in the mode it came in.

    Half-precision models (float16, bfloat16) calibrate too: the optimizer keeps float32
    copies of the sort nets (AdamW's state and small updates vanish or overflow in half
    precision) and writes them back rounded to the model's dtype after each step. A step whose
    loss or gradient is not finite raises ``FloatingPointError`` before it changes anything:
    the sort nets keep the weights of the steps before it, never NaN.

    Args:
        model: converted with [`convert`][sparse_sinkhorn.hf.convert].
        batches: an iterable of batches, each input ids ``(B, L)`` or a dict of model inputs
            (``input_ids`` and optionally ``attention_mask`` of the same shape, ...); one
            optimizer step each.
        lr: AdamW learning rate (a finite number > 0).

    Returns:
        The loss (nats per real position) of every step.
    """
    nets = [p for name, p in model.named_parameters() if ".sort_net." in name]
    if not nets or getattr(model.config, CONFIG_KEY, None) is None:
        raise ValueError("calibrate needs a model converted with sparse_sinkhorn.hf.convert")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a number, got {type(lr).__name__} {lr!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(batches, (Tensor, Mapping)):
        raise TypeError(
            "batches is an iterable of batches (each (B, L) input ids or a dict of inputs), "
            f"got one {type(batches).__name__}: pass [batch]"
        )
    frozen = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    masters = [p.detach().float().clone() for p in nets]  # what AdamW updates
    opt = torch.optim.AdamW(masters, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in nets:
            p.requires_grad_(True)
        model.eval()
        for batch in batches:
            inputs = _inputs(batch, len(losses))
            loss = _kl_to_dense(model, inputs)
            step = len(losses)
            if not torch.isfinite(loss):
                raise FloatingPointError(_not_finite("loss", loss.item(), step, nets[0].dtype))
            loss.backward()
            grads = [torch.zeros_like(m) if p.grad is None else p.grad.float() for p, m in
                     zip(nets, masters, strict=True)]  # fmt: skip
            for p in nets:
                p.grad = None
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                raise FloatingPointError(_not_finite("gradient", None, step, nets[0].dtype))
            for master, grad in zip(masters, grads, strict=True):
                master.grad = grad
            opt.step()
            with torch.no_grad():
                for p, master in zip(nets, masters, strict=True):
                    p.copy_(master)
            losses.append(loss.item())
    finally:
        for p in nets:
            p.grad = None
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(training)
    return losses


def _inputs(batch: Any, step: int) -> dict[str, Any]:
    """One batch as model inputs, checked: ``input_ids`` a non-empty ``(B, L)`` integer
    tensor, ``attention_mask`` (when given) a tensor of the same shape."""
    inputs: dict[str, Any] = (
        {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
    )  # fmt: skip
    ids = inputs.get("input_ids")
    where = f"calibrate: batch {step}"
    if not isinstance(ids, Tensor):
        raise TypeError(f"{where}: needs input_ids, a (B, L) tensor; got {type(ids).__name__}")
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            f"{where}: input_ids must be a (B, L) integer tensor, got {ids.dtype} of shape "
            f"{tuple(ids.shape)}"
        )
    if 0 in ids.shape:
        raise ValueError(f"{where}: input_ids of shape {tuple(ids.shape)} is empty")
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != ids.shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{where}: attention_mask must have input_ids' shape {tuple(ids.shape)}, got {got}"
        )
    inputs["use_cache"] = False
    return inputs


def _kl_to_dense(model: Any, inputs: dict[str, Any]) -> Tensor:
    """KL from the model's dense (``sdpa``) next-token distribution to its Sinkhorn one,
    averaged over the real positions (float32)."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            teacher = F.log_softmax(model(**inputs).logits.float(), dim=-1)
    finally:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    student = F.log_softmax(model(**inputs).logits.float(), dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # (B, L)
    mask = inputs.get("attention_mask")
    return kl.mean() if mask is None else (kl * mask).sum() / mask.sum().clamp_min(1)


def _not_finite(what: str, value: float | None, step: int, dtype: torch.dtype) -> str:
    shown = "" if value is None else f" ({value})"
    hint = (
        f"; the model is {dtype}: a float32 copy may calibrate where half precision overflows"
        if dtype in (torch.float16, torch.bfloat16)
        else ""
    )
    return (
        f"calibration {what} is not finite{shown} at step {step}; nothing of this step was "
        f"applied: the sort nets hold the weights of the {step} step(s) before it{hint}"
    )
