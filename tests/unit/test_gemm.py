"""kubetune.cpu.gemm: frozen linear layers computed in column blocks compute the same products, and a split is chosen
only where timing says so."""

from __future__ import annotations

import pytest
import torch
from test_layers import _tiny_llama, assert_same_logits_and_adapter_grads, lora_llama_pair  # on sys.path

from kubetune.cpu import gemm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_blocks_compute_the_same_product(dtype, blocks):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 96, generator=gen).to(dtype)
    w = torch.randn(192, 96, generator=gen).to(dtype)
    for b in (w.t(), w[:96]):  # a transposed weight (forward) and a plain one (input gradient)
        got = gemm.matmul_blocks(a, b, blocks)
        want = torch.mm(a, b)
        assert got.shape == want.shape and got.is_contiguous()
        # each output element is the same dot product; only the call that computes it differs
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_uneven_widths_keep_every_column():
    a, b = torch.randn(5, 8), torch.randn(8, 10)
    torch.testing.assert_close(gemm.matmul_blocks(a, b, 3), a @ b)  # blocks of 3, 3 and the last 4


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ({1: 1.0, 2: 0.5, 3: 0.8, 4: 0.9}, 2),  # twice as fast in two blocks
        ({1: 1.0, 2: 0.9, 3: 0.95, 4: 0.95}, 1),  # 1.11x: inside the noise margin, one GEMM
        ({1: 1.0, 2: 1.2, 3: 0.6, 4: 1.1}, 3),
    ],
)
def test_a_split_is_kept_only_when_clearly_faster(times, expected):
    timed = []
    blocks, seconds = gemm.best_blocks(
        16, torch.zeros(64, 768, dtype=torch.bfloat16), lambda fn, n: timed.append(n) or times[n]
    )
    assert blocks == expected and seconds == times and timed == [1, 2, 3, 4]


def test_blocks_narrower_than_the_minimum_are_not_tried():
    assert gemm._candidates(576) == [1, 2, 3, 4]  # 288, 192, 144 columns
    assert gemm._candidates(192) == [1, 2, 3]  # 96, 64 columns; not 48
    assert gemm._candidates(100) == [1]  # 50 columns, and 3 and 4 do not divide it


def test_the_real_timer_measures_what_it_is_given():
    import time

    assert gemm._median_seconds(lambda: time.sleep(0.002), 1) >= 0.002  # a sleep lasts at least that long


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_split_linear_equals_f_linear_forward_and_input_gradient(autocast, bias):
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(96, 192, bias=bias).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 7, 96, generator=gen)
    x = x if autocast else x.to(torch.bfloat16)  # under autocast an fp32 input is cast, as F.linear's would be
    dy = torch.randn(2, 7, 192, generator=gen).to(torch.bfloat16)
    outs, grads = [], []
    for fn in (lin, lambda t: gemm.SplitLinearFunction.apply(t, lin.weight, lin.bias, gemm.Plan(2, 3))):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(xi)
        y.backward(dy)
        outs.append(y)
        grads.append(xi.grad)
    assert outs[1].dtype == outs[0].dtype == torch.bfloat16 and grads[1].dtype == grads[0].dtype == x.dtype
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-2)


def _two_blocks_win(fn, blocks):
    return {1: 1.0, 2: 0.5}.get(blocks, 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_install_on_a_lora_llama_keeps_its_outputs_and_adapter_gradients(dtype):
    # 4 heads of 32, 2 key-value heads: k and v have 64 outputs, too narrow to split; their input gradient (128) is not
    ref, mod = lora_llama_pair(dtype, ["q_proj", "v_proj"], hidden=128, intermediate=256)
    got = gemm.install(mod, rows=16, timer=_two_blocks_win)
    # every frozen linear layer of the 2 decoder layers (q, k, v, o, gate, up, down); not the LM head, not the adapter
    assert got["layers"] == 2 * 7
    name = str(dtype).removeprefix("torch.")
    plans = {shape: (p["forward_blocks"], p["backward_blocks"]) for shape, p in got["plans"].items()}
    assert plans == {f"128 x 128 {name}": (2, 2), f"128 x 64 {name}": (1, 2), f"128 x 256 {name}": (2, 2),
                     f"256 x 128 {name}": (2, 2)}  # fmt: skip
    assert "forward" not in vars(mod.get_output_embeddings())
    assert not any(getattr(m, "_kubetune_split_plan", None) for n, m in mod.named_modules() if "lora_" in n)
    assert gemm.install(mod, rows=16, timer=_two_blocks_win)["layers"] == 2 * 7  # idempotent
    assert_same_logits_and_adapter_grads(ref, mod, dtype)


def test_install_leaves_layers_alone_where_one_gemm_is_fastest():
    model = _tiny_llama(torch.bfloat16, hidden=128, intermediate=256).requires_grad_(False)
    got = gemm.install(model, rows=16, timer=lambda fn, blocks: 1.0)  # every candidate ties: one GEMM
    assert got["layers"] == 0 and got["plans"]
    assert all(p["forward_blocks"] == p["backward_blocks"] == 1 for p in got["plans"].values())
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_calls_the_plan_was_not_made_for_take_torchs_path(monkeypatch):
    lin = torch.nn.Linear(64, 128, bias=False).to(torch.bfloat16).requires_grad_(False)
    assert gemm.install(torch.nn.Sequential(lin), rows=8, timer=_two_blocks_win)["layers"] == 1
    seen = []
    apply = gemm.SplitLinearFunction.apply
    monkeypatch.setattr(gemm.SplitLinearFunction, "apply", lambda *a: seen.append(a[3]) or apply(*a))
    bf16, fp32 = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(3, 64)
    lin(bf16)  # the plan's dtype: split (the input gradient's 64 columns are too few to split)
    assert seen == [gemm.Plan(2, 1)]
    with pytest.raises(RuntimeError):  # an fp32 input without autocast: torch's own path, and its own error
        lin(fp32)
    with torch.autocast("cpu", dtype=torch.float16):  # another autocast dtype: torch's own
        assert lin(fp32).dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the weight's: split
        lin(fp32)
    compiling = torch.compiler.is_compiling
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced by torch.compile: inductor's GEMMs
    lin(bf16)
    monkeypatch.setattr(torch.compiler, "is_compiling", compiling)
    lin.weight.requires_grad_(True)  # a trained weight: its gradient is torch's business
    lin(bf16)
    assert seen == [gemm.Plan(2, 1)] * 2


def test_the_timer_times_slow_gemms_fewer_times(monkeypatch):
    calls = []
    monkeypatch.setattr(gemm, "_SLOW_CALL_S", 0.0)  # every call counts as slow
    gemm._median_seconds(lambda: calls.append(1), 1)
    assert len(calls) == 2 + gemm._SLOW_REPEATS
    calls.clear()
    monkeypatch.setattr(gemm, "_SLOW_CALL_S", 1e9)
    gemm._median_seconds(lambda: calls.append(1), 1)
    assert len(calls) == gemm._WARMUP + gemm._REPEATS
