"""Model configurations: frozen dataclasses, validated, saved as JSON beside checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from ..nn.config import AttentionConfig, check_field_types

C = TypeVar("C", bound="TransformerConfig")


@dataclass(frozen=True)
class TransformerConfig:
    """What every model shares. ``attention.max_len`` is the longest input the model takes
    (it sizes the linear sort net); positions are sinusoidal, so they need no table.

    Attributes:
        vocab_size: the vocabulary size; token ids are ``0 .. vocab_size - 1``.
        d_model: model width.
        n_heads: attention heads.
        n_layers: layers (the encoder's, in a `Seq2SeqConfig`).
        d_ff: feed-forward hidden width.
        dropout: residual, attention and feed-forward dropout (training only).
        pad_id: the padding token (masked everywhere).
        attention: the self-attention layers'
            [`AttentionConfig`][sparse_sinkhorn.nn.AttentionConfig].
    """

    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    pad_id: int = 0
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):  # built from JSON
            try:
                object.__setattr__(self, "attention", AttentionConfig.from_dict(self.attention))
            except TypeError as err:
                raise TypeError(f"attention config: {err}") from err
        if not isinstance(self.attention, AttentionConfig):
            raise TypeError(
                f"attention must be an AttentionConfig (or its dict), got {self.attention!r}"
            )
        check_field_types(self)
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"pad_id={self.pad_id} is outside the vocabulary [0, {self.vocab_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the class name so
        [`config_from_dict`][sparse_sinkhorn.models.config_from_dict] can rebuild it."""
        return {"type": type(self).__name__, **asdict(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = {k: v for k, v in data.items() if k != "type"}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Seq2SeqConfig(TransformerConfig):
    """Encoder-decoder; source and target share one vocabulary.

    Attributes:
        n_decoder_layers: decoder layers (the encoder's: ``n_layers``).
        bos_id: the start-of-sequence token fed to the decoder first.
    """

    n_decoder_layers: int = 2
    bos_id: int = 1


@dataclass(frozen=True)
class LanguageModelConfig(TransformerConfig):
    """Decoder-only language model (also the pixel-wise image model).

    Attributes:
        token_conv: 0 (none), or the width ``k >= 2`` of a causal depthwise convolution added
            to the embeddings before the first layer (`TokenConv`): each position also reads
            the ``k - 1`` positions before it, which lets attention match a token by what
            precedes it (an associative-recall lookup) without first learning a
            previous-token head.
    """

    token_conv: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token_conv == 1 or self.token_conv < 0:
            raise ValueError(f"token_conv must be 0 (none) or a width >= 2, got {self.token_conv}")


@dataclass(frozen=True)
class ClassifierConfig(TransformerConfig):
    """Encoder with pooling and a classification head; one sequence or a pair.

    Attributes:
        n_classes: output classes (at least 2).
        pooling: ``"mean"`` over the real tokens, or ``"first"`` (the ``[CLS]`` position).
        pair: ``"none"`` (one sequence), ``"concat"`` (a pair as one sequence with segment
            ids) or ``"separate"`` (siamese: each side encoded alone).
    """

    n_classes: int = 2
    pooling: str = "mean"
    pair: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.pooling not in ("mean", "first"):
            raise ValueError(f"pooling must be 'mean' or 'first', got {self.pooling!r}")
        if self.pair not in ("none", "concat", "separate"):
            raise ValueError(f"pair must be 'none', 'concat' or 'separate', got {self.pair!r}")


_CONFIGS: dict[str, type[TransformerConfig]] = {
    c.__name__: c for c in (Seq2SeqConfig, LanguageModelConfig, ClassifierConfig)
}


def config_from_dict(data: dict[str, Any]) -> TransformerConfig:
    """Rebuild any model config from
    [`TransformerConfig.to_dict`][sparse_sinkhorn.models.TransformerConfig.to_dict] output."""
    if not isinstance(data, dict):
        raise TypeError(f"a model config must be a JSON object, got {type(data).__name__}")
    name = data.get("type")
    if name not in _CONFIGS:
        raise ValueError(f"unknown model config type {name!r}; expected one of {sorted(_CONFIGS)}")
    return _CONFIGS[name].from_dict(data)
