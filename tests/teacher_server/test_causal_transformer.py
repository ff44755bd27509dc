"""The causal transformer keeps the sequence model contract: shapes, padding, causality, ties."""

from __future__ import annotations

import pytest
import torch

from teacher_server.models.causal_transformer import CausalTransformer

VOCAB = 97


def _model(positions: str = "rotary") -> CausalTransformer:
    torch.manual_seed(0)
    model = CausalTransformer(
        {"next_token": VOCAB, "topic": 3},
        vocab_size=VOCAB,
        max_length=24,
        dim=32,
        layers=2,
        attention_heads=4,
        positions=positions,
        hint_layers=[1, 2],
    )
    return model.eval()


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_contract_attributes_and_shapes(positions: str) -> None:
    model = _model(positions)
    assert model.task_levels == {"next_token": "token", "topic": "sequence"}
    assert set(model.heads.keys()) == {"next_token", "topic"}
    assert (model.vocab_size, model.max_length) == (VOCAB, 24)
    ids = torch.randint(0, VOCAB, (3, 10))
    lengths = torch.tensor([10, 4, 7])
    features = model.forward_features(ids, lengths)
    assert features["tokens"].shape == (3, 10, 32)
    assert features["sequence"].shape == (3, 32)
    assert features["layer_1"].shape == features["layer_2"].shape == (3, 10, 32)
    outputs = model(ids, lengths)
    assert outputs["next_token"].shape == (3, 10, VOCAB)
    assert outputs["topic"].shape == (3, 3)
    assert all(o.dtype == torch.float32 for o in outputs.values())
    # heads map hidden (..., dim) to logits: the sequence state is the last real token's state
    torch.testing.assert_close(features["sequence"][1], features["tokens"][1, 3])
    torch.testing.assert_close(outputs["topic"], model.heads["topic"](features["sequence"]))


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_padding_never_reaches_a_real_position(positions: str) -> None:
    model = _model(positions)
    generator = torch.Generator().manual_seed(1)
    short = torch.randint(0, VOCAB, (5,), generator=generator)
    batch = torch.randint(0, VOCAB, (3, 20), generator=generator)  # longer neighbours
    batch[1, :5] = short
    batch[1, 5:] = torch.randint(0, VOCAB, (15,), generator=generator)  # garbage padding
    with torch.inference_mode():
        alone = model(short[None], torch.tensor([5]))
        alone_features = model.forward_features(short[None], torch.tensor([5]))
        padded = model(batch, torch.tensor([20, 5, 12]))
        padded_features = model.forward_features(batch, torch.tensor([20, 5, 12]))
    torch.testing.assert_close(
        padded["next_token"][1, :5], alone["next_token"][0], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(padded["topic"][1], alone["topic"][0], atol=1e-5, rtol=1e-5)
    for hint in ("layer_1", "layer_2", "tokens"):
        torch.testing.assert_close(
            padded_features[hint][1, :5], alone_features[hint][0], atol=1e-5, rtol=1e-5
        )


def test_a_later_token_does_not_change_earlier_positions() -> None:
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % VOCAB
    lengths = torch.tensor([12])
    with torch.inference_mode():
        before, after = model(ids, lengths), model(changed, lengths)
    torch.testing.assert_close(before["next_token"][0, :8], after["next_token"][0, :8])
    assert not torch.allclose(before["next_token"][0, 8:], after["next_token"][0, 8:])


def test_input_and_output_embeddings_are_tied_and_saved_once() -> None:
    model = _model()
    state = model.state_dict()
    vocab_weights = [name for name, value in state.items() if value.shape == (VOCAB, 32)]
    assert vocab_weights == ["heads.next_token.weight"]
    ids, lengths = torch.tensor([[3, 5]]), torch.tensor([2])
    before = model(ids, lengths)["topic"]
    with torch.no_grad():
        model.heads["next_token"].weight[3] *= -2.0  # the input embedding of token 3 too
    assert not torch.allclose(before, model(ids, lengths)["topic"])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="vocab_size=50"):
        CausalTransformer({"next_token": 49}, vocab_size=50)
    with pytest.raises(ValueError, match="positions"):
        CausalTransformer({"next_token": 50}, vocab_size=50, positions="alibi")
    model = _model()
    with pytest.raises(ValueError, match="max_length 24"):
        model(torch.zeros(1, 25, dtype=torch.long), torch.tensor([25]))
