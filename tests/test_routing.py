"""The routing object (`nn.Routing`): what each ``shared_routing`` value builds, equal outputs
between equivalent stacks, and the op options built once per layer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import AttentionConfig, Routing
from sparse_sinkhorn.nn.config import SHARED_ROUTINGS

ATT = AttentionConfig(block_size=4, max_len=64, sort_net="bilinear", balance="softmax")


def _model(shared: str, n_layers: int = 3, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    att = replace(ATT, shared_routing=shared)
    cfg = LanguageModelConfig(
        vocab_size=13, d_model=16, n_heads=2, n_layers=n_layers, d_ff=32, attention=att
    )
    return LanguageModel(cfg).double()


@pytest.mark.parametrize("shared", SHARED_ROUTINGS)
def test_each_value_is_one_routing_object(shared: str) -> None:
    """The stack owns the config's `Routing`; its layers own a sort net exactly where
    `Routing.has_sort_net` says, and each route by `Routing.source`'s logits."""
    model = _model(shared).eval()
    stack = model.decoder.layers
    routing = stack.routing
    assert routing == Routing.from_config(model.config.attention)
    assert routing.shared_routing == shared
    nets = [a.sort_net for a in stack.attentions()]
    assert [n is not None for n in nets] == [routing.has_sort_net(i) for i in range(3)]
    assert all(n is None or n.n_scored == (1 if routing.heads else 2) for n in nets)
    assert all(n is None or (n.block_size, n.pooling) == (4, "sum") for n in nets)
    assert [routing.source(i) for i in range(3)] == ([0, 0, 0] if shared == "layers" else [0, 1, 2])
    ids = torch.randint(0, 13, (2, 23))
    calls: list[int] = []
    for i, net in enumerate(nets):
        if net is not None:
            net.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    out = model(ids)
    assert calls == sorted({routing.source(i) for i in range(3)})  # each source once
    torch.manual_seed(0)
    again = _model(shared).eval()
    assert torch.equal(again(ids), out)  # fixed seed: the same model and output


@pytest.mark.parametrize("training", [False, True])
def test_one_layer_shared_by_layers_equals_shared_by_heads(training: bool) -> None:
    """With one layer, ``"layers"`` is ``"heads"``: the same parameters and, with the same
    weights and seed, the same output (``torch.equal``)."""
    layers, heads = _model("layers", 1), _model("heads", 1, seed=1)
    heads.load_state_dict(layers.state_dict())  # strict: the same keys and shapes
    ids = torch.randint(0, 13, (2, 21))
    outs = []
    for model in (layers, heads):
        torch.manual_seed(5)
        outs.append(model.train(training)(ids))
    assert torch.equal(outs[0], outs[1])


def test_first_routing_with_idle_nets_equals_shared_by_layers() -> None:
    """A ``"heads"`` stack told to route every layer by the first one's logits
    (`LayerStack.share_first_routing`, the recall control ``shared-max-shared``) equals the
    ``"layers"`` model with the same weights; its later sort nets stay, unused; decoding with
    a cache follows the first layer's cache (equal to the full forward)."""
    idle, layers = _model("heads"), _model("layers", seed=1)
    idle.decoder.layers.share_first_routing()
    assert idle.decoder.layers.routing == Routing(4, "sum", heads=True, layers=True, idle_nets=True)
    missing, unexpected = idle.load_state_dict(layers.state_dict(), strict=False)
    assert not unexpected and missing and all(".sort_net." in k for k in missing)
    ids = torch.randint(0, 13, (2, 23))
    for training in (False, True):
        torch.manual_seed(3)
        a = idle.train(training)(ids)
        torch.manual_seed(3)
        assert torch.equal(a, layers.train(training)(ids))
    idle.eval()
    cache = idle.new_cache()
    steps = [idle(ids[:, :6], cache=cache)] + [
        idle(ids[:, t : t + 1], cache=cache) for t in range(6, 23)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), idle(ids), atol=1e-10, rtol=0)


def test_op_options_are_built_once_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward (training or eval) builds no `SinkhornOptions`: each layer holds its two."""
    model = _model("none")
    built: list[bool] = []
    original = AttentionConfig.op_options

    def counting(self: AttentionConfig, **kwargs: object) -> object:
        built.append(True)
        return original(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(AttentionConfig, "op_options", counting)
    ids = torch.randint(0, 13, (2, 23))
    model.train()(ids)
    model.eval()(ids)
    assert not built


def test_routing_checks_the_layer_config() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Routing(block_size=8).check(ATT)
    with pytest.raises(ValueError, match="does not fit"):
        Routing(4, "sum").check(replace(ATT, shared_routing="layers"))
    Routing(4, "sum", heads=True, layers=True, idle_nets=True).check(
        replace(ATT, shared_routing="heads")
    )
