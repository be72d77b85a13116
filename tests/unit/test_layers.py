"""kubetune.cpu.layers: the lean RMSNorm and SiLU-gated MLP compute what transformers' modules compute."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from kubetune.cpu import layers


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


def _tiny_llama(dtype=torch.float32, hidden: int = 32, intermediate: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
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
    ref, mod = lora_llama_pair(dtype, "all-linear")
    assert layers.install(mod) == {"norms": 5, "mlps": 2, "linear4bit": 0}  # 2 layers x 2 norms + the final norm
    assert layers.install(mod) == {"norms": 5, "mlps": 2, "linear4bit": 0}  # idempotent
    assert_same_logits_and_adapter_grads(ref, mod, dtype)


def lora_llama_pair(dtype, target_modules, **llama) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two equal LoRA Llamas (the same base and adapter weights) in training mode."""
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama(dtype, **llama)
    twin = copy.deepcopy(base)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules, init_lora_weights=False)
    models = []
    for m in (base, twin):
        torch.manual_seed(4)
        models.append(get_peft_model(m, copy.deepcopy(cfg)).train())
    return models[0], models[1]


def assert_same_logits_and_adapter_grads(ref: torch.nn.Module, mod: torch.nn.Module, dtype: torch.dtype) -> None:
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(5))
    out_ref = ref(input_ids=ids, labels=ids)
    out_mod = mod(input_ids=ids, labels=ids)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out_mod.logits, out_ref.logits, rtol=tol, atol=tol)
    out_ref.loss.backward()
    out_mod.loss.backward()
    named = zip(ref.named_parameters(), mod.named_parameters(), strict=True)
    pairs = [(p1, p2) for (_, p1), (_, p2) in named if p1.requires_grad]
    assert pairs and all(p2.grad is not None for _, p2 in pairs)
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
    assert layers.install(model) == {"norms": 0, "mlps": 0, "linear4bit": 0}
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
    assert counts == {"norms": 4, "mlps": 2, "linear4bit": 0}
    assert not hasattr(norm, "_kubetune_lean")


# ------------------------------------------------------------------------------------------------------------------
# bitsandbytes 4-bit linear layers (QLoRA on a CPU)


def _linear4bit(
    quant_type: str = "nf4", nested: bool = True, bias: bool = True, out_features: int = 96, blocksize: int = 64
):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(6)
    lin = bnb.nn.Linear4bit(
        64,
        out_features,
        bias=bias,
        compute_dtype=torch.bfloat16,
        compress_statistics=nested,
        quant_type=quant_type,
    )
    lin.weight = bnb.nn.Params4bit(
        lin.weight.data, requires_grad=False, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )
    lin = lin.to("cpu")  # quantises the weight
    if bias:
        lin.bias.data.uniform_(-1, 1)
        lin.bias.requires_grad_(True)
    return lin.train()


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_4bit_matches_bitsandbytes_in_a_reused_buffer(quant_type, nested, dtype):
    import bitsandbytes.functional as bnbf

    lin = _linear4bit(quant_type, nested)
    weight = lin.weight
    want = bnbf.dequantize_4bit(weight, weight.quant_state).to(dtype)
    got = layers.dequantize_4bit(weight, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    again = layers.dequantize_4bit(weight, dtype)
    assert again.data_ptr() == got.data_ptr()  # the same buffer
    smaller = _linear4bit(quant_type, nested, out_features=32).weight
    assert layers.dequantize_4bit(smaller, dtype).data_ptr() == got.data_ptr()  # a view of it, not a new tensor
    layers.release_workspace()


def test_dequantize_4bit_where_bitsandbytes_has_no_cpu_routine_for_it():
    import bitsandbytes.functional as bnbf

    weight = _linear4bit(out_features=128, blocksize=4096).weight  # blocks of 4096: bitsandbytes' torch fallback
    assert weight.quant_state.blocksize == 4096 and layers._native_routines(weight.quant_state, torch.bfloat16) is None
    want = bnbf.dequantize_4bit(weight, weight.quant_state).to(torch.bfloat16)
    assert torch.equal(layers.dequantize_4bit(weight, torch.bfloat16), want)


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_function_matches_bitsandbytes_forward_and_backward(autocast, bias):
    lin = _linear4bit(bias=bias)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    dy = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    results = []
    for fn in (lin, lambda t: layers._linear4bit_product(lin, t)):
        lin.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(xi)
        y.backward(dy)
        results.append((y, xi.grad, lin.bias.grad if bias else None))
    (y1, dx1, db1), (y2, dx2, db2) = results
    assert y2.dtype == y1.dtype == torch.bfloat16
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    torch.testing.assert_close(dx2, dx1, rtol=0, atol=0)
    if bias:  # summed in fp32 here; within bf16 rounding of the exact sum, as bitsandbytes' is
        exact = dy.double().sum((0, 1))
        assert (db2.double() - exact).abs().max() <= (db1.double() - exact).abs().max() + 1e-6
        torch.testing.assert_close(db2.double(), exact, rtol=8e-3, atol=8e-3)
    layers.release_workspace()


def test_install_routes_a_qlora_llama_through_the_lean_4bit_layers(tmp_path):
    pytest.importorskip("bitsandbytes")
    from conftest import build_tiny_model, build_tiny_tokenizer
    from peft import LoraConfig, get_peft_model

    from kubetune import models
    from kubetune.config import ModelConfig, QuantConfig

    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden=64).to(torch.bfloat16).save_pretrained(tmp_path)
    quant = QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    peft_models = []
    for _ in range(2):
        model = models.load_model(ModelConfig(name_or_path=str(tmp_path)), dtype="bf16", quant=quant)
        model = models.prepare_kbit_model(model, precision="bf16", activation_checkpointing=False)
        torch.manual_seed(4)
        peft_models.append(get_peft_model(model, copy.deepcopy(cfg)).train())
    ref, mod = peft_models
    counts = layers.install(mod)
    assert counts == {"norms": 5, "mlps": 2, "linear4bit": 14}  # 7 quantised projections in each of 2 layers
    assert layers.install(mod) == counts  # idempotent
    ids = torch.randint(0, len(tok), (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = ref(input_ids=ids, labels=ids)
        out_mod = mod(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_mod.logits, out_ref.logits, rtol=2e-2, atol=2e-2)
    out_ref.loss.backward()
    out_mod.loss.backward()
    named = zip(ref.named_parameters(), mod.named_parameters(), strict=True)
    pairs = [(n, p1, p2) for (n, p1), (_, p2) in named if p1.requires_grad]
    assert len(pairs) == 28  # lora_A and lora_B of each projection
    for name, p1, p2 in pairs:
        torch.testing.assert_close(p2.grad, p1.grad, rtol=0.1, atol=2e-2, msg=name)
    # in eval mode the 4-bit layers run bitsandbytes' own forward (its inference path)
    mod.eval()
    with torch.no_grad():
        torch.testing.assert_close(mod(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
    layers.release_workspace()
