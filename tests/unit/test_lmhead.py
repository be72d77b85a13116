"""The token-chunked LM head matches TRL's fused head: outputs, gradients, and the loss of a training step."""

from __future__ import annotations

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from kubetune.cpu import lmhead
from kubetune.cpu.lmhead import TokenChunkedLogProb

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _inputs(n=300, hidden=48, vocab=1000, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.2
    b = torch.randn(vocab, generator=g) * 0.1 if bias else None
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, t


def _run(fn, h, w, b, t, *, temperature=1.0, softcap=None, scale=1.0, autocast=False, train_weight=False):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(train_weight)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn.apply(h, w, b, t, temperature, 128, softcap, scale, OUTPUTS)
    # a loss that weighs tokens differently, so that a wrong per-token gradient shows
    weights = torch.linspace(0.5, 1.5, h.shape[0])
    (-(out[0] * weights).sum()).backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.7, "scale": 1.3},
        {"softcap": 5.0},
        {"bias": True},
        {"recompute": True, "scale": 1.3},
    ],
    ids=["plain", "temperature-scale", "softcap", "bias", "recomputed-in-backward"],
)
def test_matches_trl_in_fp32(kw, monkeypatch):
    monkeypatch.setattr(lmhead, "CHUNK_ELEMENTS", 64 * 1000)  # several token chunks with a ragged last one
    if kw.pop("recompute", False):  # too large to keep the probabilities: backward recomputes the logits
        monkeypatch.setattr(lmhead, "SAVE_PROBS_BYTES", 0)
    h, w, b, t = _inputs(bias=kw.pop("bias", False))
    ref, ref_gh, _ = _run(ChunkedLogProbFunction, h, w, b, t, **kw)
    got, got_gh, _ = _run(TokenChunkedLogProb, h, w, b, t, **kw)
    for name, r, x in zip(OUTPUTS, ref, got, strict=True):
        if name == "is_top1":
            assert torch.equal(r, x)
        else:
            torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(got_gh, ref_gh, rtol=1e-4, atol=1e-6)


def test_weight_gradient_matches_when_the_head_trains():
    h, w, b, t = _inputs(n=64, vocab=300)
    _, _, ref = _run(ChunkedLogProbFunction, h, w, b, t, train_weight=True)
    _, _, got = _run(TokenChunkedLogProb, h, w, b, t, train_weight=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_agrees_with_trl_within_bf16_rounding():
    h, w, b, t = _inputs(n=200, hidden=64, vocab=2000)
    ref, ref_gh, _ = _run(ChunkedLogProbFunction, h, w, b, t, autocast=True)
    got, got_gh, _ = _run(TokenChunkedLogProb, h, w, b, t, autocast=True)
    assert got[0].dtype == torch.float32
    # Both round the logits to bf16 and reduce in fp32; the two GEMMs may tile (and so round) differently on other
    # CPUs, by at most about one bf16 step of a logit (1/64 at these magnitudes), and rarely.
    for r, x in ((ref[0], got[0]), (ref[1], got[1])):
        diff = (x - r).abs()
        assert diff.max() < 3e-2 and diff.mean() < 3e-3, (diff.max(), diff.mean())
    # TRL accumulates its backward GEMM in fp32, this head in bf16: differences of bf16 rounding only
    rel = (got_gh - ref_gh).norm() / ref_gh.norm()
    assert rel < 2e-2, rel


def test_chunk_size_bounds_memory_and_never_drops_to_nothing():
    assert lmhead.chunk_tokens(49152) == 341
    assert lmhead.chunk_tokens(128256) == 130
    assert lmhead.chunk_tokens(1000) == lmhead.MAX_CHUNK_TOKENS
    assert lmhead.chunk_tokens(10**9) == 16


def test_hook_is_installed_only_inside_the_block():
    import trl.trainer.utils as trl_utils

    before = trl_utils._ChunkedLogProbFunction
    with lmhead.token_chunked_head() as installed:
        assert installed  # the pinned TRL has both hooks; when an upgrade removes one, this test says so
        assert trl_utils._ChunkedLogProbFunction is lmhead._EagerHead  # TokenChunkedLogProb, never traced
        assert trl_utils._use_triton(torch.device("cpu"))
    assert trl_utils._ChunkedLogProbFunction is before
    assert not trl_utils._use_triton(torch.device("cpu"))


def test_fused_forward_loss_is_the_same_through_either_head(tiny_model_dir):
    """TRL's patched forward with labels on some positions: same loss and gradients with the hook installed."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(3, model.config.vocab_size, (1, 40))
    labels = ids.clone()
    labels[0, :15] = -100  # prompt tokens carry no loss

    def loss_and_grad():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grad = model.get_input_embeddings().weight.grad.clone()
        return out.loss.detach(), out.entropy.detach(), out.is_top1, grad

    ref = loss_and_grad()
    with lmhead.token_chunked_head():
        got = loss_and_grad()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[3], ref[3], rtol=1e-4, atol=1e-6)


def test_kept_probabilities_reuse_one_buffer_and_never_alias():
    """The probabilities saved for backward live in a reused buffer, handed back by backward; a second forward before
    that backward gets memory of its own, so neither call's backward reads the other's."""
    h, w, b, t = _inputs(n=64, vocab=300)
    ref = [_run(ChunkedLogProbFunction, h * k, w, b, t)[1] for k in (1.0, 2.0)]
    lmhead.release_workspace()
    try:
        h1, h2 = (h * 1.0).requires_grad_(), (h * 2.0).requires_grad_()
        out1 = TokenChunkedLogProb.apply(h1, w, b, t, 1.0, 128, None, 1.0, OUTPUTS)
        out2 = TokenChunkedLogProb.apply(h2, w, b, t, 1.0, 128, None, 1.0, OUTPUTS)  # before out1's backward
        weights = torch.linspace(0.5, 1.5, h.shape[0])
        (-(out2[0] * weights).sum()).backward()
        (-(out1[0] * weights).sum()).backward()
        torch.testing.assert_close(h1.grad, ref[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(h2.grad, ref[1], rtol=1e-4, atol=1e-6)
        # handed back: the next call takes the buffer again
        out3 = TokenChunkedLogProb.apply(h.clone().requires_grad_(), w, b, t, 1.0, 128, None, 1.0, OUTPUTS)
        _, leased = lmhead._WORKSPACE.lease("probs", (1, 1), torch.float32, torch.device("cpu"))
        assert not leased  # out3 holds it until its backward
        del out3
    finally:
        lmhead.release_workspace()
