"""kubetune.cpu.dropout: LoRA dropout with masks drawn three 16-bit lanes per 64-bit random number."""

from __future__ import annotations

import math

import pytest
import torch

from kubetune.cpu import dropout
from kubetune.cpu.dropout import BulkDropout


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.0, 0.0), (0.05, 3277 / 65536), (0.1, 6554 / 65536), (0.5, 0.5), (1.0, 1.0), (1e-9, 0.0)],
)
def test_effective_probability_is_p_rounded_to_a_65536th(p, expected):
    assert dropout.effective_p(p) == expected
    assert abs(dropout.effective_p(p) - p) <= 0.5 / 65536


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_masks_drop_at_the_rate_and_independently(p):
    torch.manual_seed(0)
    n = 3_000_000
    keep = dropout.keep_mask((n,), p)
    q = dropout.effective_p(p)
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs((~keep).float().mean().item() - q) < 5 * sigma
    # neighbours (lanes of one 64-bit draw, and across draws) are independent: pairs drop at q^2
    for lag in (1, 2, 3, 4):
        both = ((~keep[:-lag]) & (~keep[lag:])).float().mean().item()
        assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n), lag
    # every position of a draw drops at the same rate (lane 3, always 0, is not used)
    by_lane = (~keep[: n - n % 3]).view(-1, 3).float().mean(0)
    assert (by_lane - q).abs().max().item() < 5 * math.sqrt(q * (1 - q) / (n / 3))


def test_odd_sizes_and_shapes():
    for shape in [(1,), (2,), (5, 7), (1, 3, 11)]:
        assert dropout.keep_mask(shape, 0.5).shape == torch.Size(shape)


def test_training_output_and_gradient_are_the_masked_scaled_input():
    torch.manual_seed(1)
    drop = BulkDropout(0.25).train()
    x = torch.randn(64, 96, requires_grad=True)
    y = drop(x)
    kept = y != 0
    scale = 1 / (1 - dropout.effective_p(0.25))
    torch.testing.assert_close(y[kept], x[kept] * scale)
    assert 0.15 < 1 - kept.float().mean().item() < 0.35
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() * scale)


def test_expectation_is_kept():
    torch.manual_seed(2)
    x = torch.full((2_000_000,), 3.0)
    assert BulkDropout(0.05).train()(x).mean().item() == pytest.approx(3.0, rel=2e-3)


def test_bf16_input_stays_bf16():
    y = BulkDropout(0.1).train()(torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True))
    assert y.dtype == torch.bfloat16


def test_eval_mode_zero_and_one():
    x = torch.randn(10, 10)
    assert BulkDropout(0.5).eval()(x) is x
    assert BulkDropout(0.0).train()(x) is x
    assert torch.count_nonzero(BulkDropout(1.0).train()(x)) == 0
    with pytest.raises(ValueError, match="dropout probability"):
        BulkDropout(1.5)


def test_seeded_and_resumable_like_nn_dropout():
    """Masks come from torch's default generator: the same seed, or a restored RNG state, gives the same masks (what
    the Trainer relies on when it resumes from a checkpoint)."""
    drop = BulkDropout(0.1).train()
    x = torch.ones(1000)
    torch.manual_seed(7)
    a = drop(x)
    state = torch.get_rng_state()
    b = drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), a)
    torch.set_rng_state(state)
    assert torch.equal(drop(x), b)
    assert not torch.equal(a, b)


def test_install_replaces_only_lora_dropouts(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    other = sum(type(m) is torch.nn.Dropout for m in model.modules())
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    layers = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict))
    assert layers > 0
    assert dropout.install(model) == layers
    assert sum(isinstance(m, BulkDropout) for m in model.modules()) == layers
    assert sum(type(m) is torch.nn.Dropout for m in model.modules()) == other  # the model's own are untouched
    assert dropout.install(model) == 0  # idempotent
    assert model.peft_config["default"].lora_dropout == 0.05  # what is saved with the adapter is unchanged
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_install_leaves_a_dropout_free_adapter_alone(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    assert dropout.install(model) == 0


def test_compiled_models_get_inductors_dropout(monkeypatch):
    """Under torch.compile the module hands over to torch's dropout, which inductor generates itself."""
    # the 16-bit views that inductor cannot compile must never be traced
    monkeypatch.setattr(dropout, "keep_mask", lambda *a, **kw: pytest.fail("bulk masks traced under compile"))
    torch._dynamo.reset()
    drop = BulkDropout(0.5).train()
    compiled = torch.compile(drop, backend="eager")  # dynamo's tracing, without a C++ toolchain
    torch.manual_seed(0)
    x = torch.ones(4096, requires_grad=True)
    y = compiled(x)
    assert set(torch.unique(y.detach()).tolist()) == {0.0, 2.0}
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def test_bf16_inputs_are_scaled_in_fp32():
    """Kept bf16 elements are x * (1 / (1 - p)) rounded once: no bias from a bf16 copy of the scale (1.0547 for
    p=0.05, 0.2% high)."""
    torch.manual_seed(6)
    x = (torch.rand(400_000) + 0.5).to(torch.bfloat16)
    y = BulkDropout(0.05).train()(x)
    kept = y != 0
    scale = 1 / (1 - dropout.effective_p(0.05))
    assert torch.equal(y[kept], (x[kept].float() * scale).to(torch.bfloat16))
    ratio = (y[kept].double() / x[kept].double()).mean().item()
    assert ratio == pytest.approx(scale, rel=2e-4)
