"""Models: encoder-decoder, decoder-only LM, encoder classifier (configs are dataclasses)."""

from __future__ import annotations

from torch import nn

from .classifier import Classifier
from .common import TokenConv
from .config import (
    ClassifierConfig,
    LanguageModelConfig,
    Seq2SeqConfig,
    TransformerConfig,
    config_from_dict,
)
from .language_model import LanguageModel
from .seq2seq import Seq2Seq


def build_model(config: TransformerConfig) -> nn.Module:
    """The model a config describes."""
    if isinstance(config, Seq2SeqConfig):
        return Seq2Seq(config)
    if isinstance(config, LanguageModelConfig):
        return LanguageModel(config)
    if isinstance(config, ClassifierConfig):
        return Classifier(config)
    raise TypeError(f"no model for config type {type(config).__name__}")


__all__ = [
    "Classifier",
    "ClassifierConfig",
    "LanguageModel",
    "LanguageModelConfig",
    "Seq2Seq",
    "Seq2SeqConfig",
    "TokenConv",
    "TransformerConfig",
    "build_model",
    "config_from_dict",
]
