"""kubetune.layers: the lean RMSNorm and SiLU-gated MLP compute what transformers' modules compute."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from kubetune import layers


def _norm(width: int, dtype: torch.dtype, trainable: bool = False) -> LlamaRMSNorm:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    return norm.to(dtype).requires_grad_(trainable)


def _grads(fn, x: torch.Tensor, dy: torch.Tensor, *params: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward(dy)
    return (x.grad, *(p.grad for p in params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_forward_matches_transformers(dtype):
    norm = _norm(96, dtype)
    x = (torch.randn(2, 7, 96) * 3).to(dtype)
    want = norm(x)
    got = layers.RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == dtype
    # fp32: rounding order only; bf16: at most one unit in the last place (the mean of squares is summed differently)
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_gradients_are_as_accurate_as_transformers(dtype):
    norm = _norm(64, dtype, trainable=True)
    x = (torch.randn(3, 5, 64) * 2).to(dtype)
    dy = torch.randn(3, 5, 64).to(dtype)
    ref_norm = copy.deepcopy(norm).double()
    want = _grads(ref_norm, x.double(), dy.double(), ref_norm.weight)
    theirs = _grads(norm, x, dy, norm.weight)
    norm.weight.grad = None
    ours = _grads(lambda t: layers.RMSNormFunction.apply(t, norm.weight, norm.variance_epsilon), x, dy, norm.weight)
    for mine, hf, exact in zip(ours, theirs, want, strict=True):
        assert mine.dtype == hf.dtype
        err_mine = (mine.double() - exact).abs().max().item()
        err_hf = (hf.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        assert err_mine <= max(2 * err_hf, 1e-6 * scale), (err_mine, err_hf)


def test_rmsnorm_frozen_weight_gets_no_gradient():
    norm = _norm(32, torch.float32)
    x = torch.randn(4, 32, requires_grad=True)
    layers.RMSNormFunction.apply(x, norm.weight, 1e-5).sum().backward()
    assert x.grad is not None and norm.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_autograd(dtype):
    torch.manual_seed(1)
    gate, up = (torch.randn(2, 9, 48).to(dtype) for _ in range(2))
    dh = torch.randn(2, 9, 48).to(dtype)
    g1, u1 = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    want = torch.nn.functional.silu(g1) * u1
    want.backward(dh)
    g2, u2 = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    got = layers.SiluMulFunction.apply(g2, u2)
    got.backward(dh)
    assert torch.equal(got, want)  # the same ops in the same order
    assert torch.equal(u2.grad, u1.grad)
    torch.testing.assert_close(g2.grad, g1.grad, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)


def _tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).to(dtype)
    for m in model.modules():
        if isinstance(m, LlamaRMSNorm):
            m.weight.data.uniform_(0.5, 1.5)  # not all ones: the weight must be applied
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_install_on_a_llama_keeps_its_outputs_and_gradients(dtype):
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama(dtype)
    lean = copy.deepcopy(base)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    models = []
    for m in (base, lean):
        torch.manual_seed(4)
        models.append(get_peft_model(m, copy.deepcopy(cfg)).train())
    ref, mod = models
    assert layers.install(mod) == {"norms": 5, "mlps": 2}  # 2 layers x 2 norms + the final norm
    assert layers.install(mod) == {"norms": 5, "mlps": 2}  # idempotent
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(5))
    out_ref = ref(input_ids=ids, labels=ids)
    out_mod = mod(input_ids=ids, labels=ids)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out_mod.logits, out_ref.logits, rtol=tol, atol=tol)
    out_ref.loss.backward()
    out_mod.loss.backward()
    named = zip(ref.named_parameters(), mod.named_parameters(), strict=True)
    pairs = [(p1, p2) for (_, p1), (_, p2) in named if p1.requires_grad]
    assert pairs
    for p1, p2 in pairs:
        torch.testing.assert_close(p2.grad, p1.grad, rtol=tol * 5, atol=tol)


def test_modules_that_compute_something_else_are_left_alone():
    class GemmaLikeRMSNorm(torch.nn.Module):  # (1 + weight), as Gemma's norm
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(16))
            self.eps = 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, hidden_act="gelu")
    model = torch.nn.ModuleDict({"norm": GemmaLikeRMSNorm(), "mlp": LlamaMLP(config)})
    forwards = {name: m.forward for name, m in model.items()}
    assert layers.install(model) == {"norms": 0, "mlps": 0}
    assert all(model[name].forward == f for name, f in forwards.items())
    assert not any(hasattr(m, "_kubetune_lean") for m in model.values())


def test_install_checks_in_eval_mode_and_restores_training_flags():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear")).train()
    flags = {name: m.training for name, m in model.named_modules()}
    assert layers.install(model)["mlps"] == 2  # dropout in the LoRA layers did not make the probe differ
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_modules_whose_forward_is_already_replaced_are_left_alone():
    model = _tiny_llama()
    norm = model.model.norm
    hooked = norm.forward  # what accelerate's hooks do: an instance attribute wrapping the forward
    norm.forward = lambda x: hooked(x)
    counts = layers.install(model)
    assert counts == {"norms": 4, "mlps": 2}
    assert not hasattr(norm, "_kubetune_lean")
