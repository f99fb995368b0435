"""The PLA reference: parallel chunked form == recurrent form == naive spec equation (fp64)."""
import pytest
import torch

from kernels.pla import PLAState, encoder_state, pla_decode_step, pla_prefill, prefix_linear_attention, taylor_feature_map
from kernels.pla.reference import pla_recurrent, pla_reference


def naive_pla(q, k, v, k_enc, v_enc, eps=1e-12, key_mask=None):
    """O(N^2) evaluation of the spec equation with explicit 1+f+f^2 features."""
    pq, pk, pe = taylor_feature_map(q), taylor_feature_map(k), taylor_feature_map(k_enc)
    if key_mask is not None:
        pk = pk * key_mask[:, None, : k.shape[2], None]
        pe = pe * key_mask[:, None, : k_enc.shape[2], None]
    num_e = pq @ (pe.transpose(-1, -2) @ v_enc)               # phi(q_i) S_e
    den_e = pq @ pe.sum(-2).unsqueeze(-1)                      # phi(q_i) . z_e
    A = (pq @ pk.transpose(-1, -2)).tril()                     # phi(q_i).phi(k_j), j <= i
    num = num_e + A @ v
    den = den_e.squeeze(-1) + A.sum(-1)
    return num / (den + eps).unsqueeze(-1)


def make(B, H, N, M, f, dv, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    return r(B, H, N, f), r(B, H, N, f), r(B, H, N, dv), r(B, H, M, f), r(B, H, M, dv)


def test_feature_map_identity():
    x, y = torch.randn(2, 5, 16, dtype=torch.float64).unbind(0)
    lhs = (taylor_feature_map(x) * taylor_feature_map(y)).sum(-1)
    s = (x * y).sum(-1) / 4.0
    assert taylor_feature_map(x).shape[-1] == 273
    torch.testing.assert_close(lhs, 1 + s + s * s / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,M,chunk", [(7, 12, 4), (12, 12, 4), (37, 12, 8), (64, 16, 16), (50, 1, 64), (130, 33, 64)])
def test_parallel_recurrent_naive_agree(N, M, chunk):
    q, k, v, ke, ve = make(2, 3, N, M, 16, 5, seed=N)
    y_naive = naive_pla(q, k, v, ke, ve)
    y_par = pla_reference(q, k, v, ke, ve, chunk=chunk)
    y_rec, st_rec = pla_recurrent(q, k, v, ke, ve)
    torch.testing.assert_close(y_par, y_naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_rec, y_naive, rtol=1e-10, atol=1e-10)
    y_pf, st = pla_prefill(q, k, v, ke, ve)
    torch.testing.assert_close(y_pf, y_naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.S, st_rec.S, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(st.z, st_rec.z, rtol=1e-10, atol=1e-9)
    # final state == encoder state + every causal term
    pk = taylor_feature_map(k)
    enc = encoder_state(ke, ve)
    torch.testing.assert_close(st.S, enc.S + pk.transpose(-1, -2) @ v, rtol=1e-10, atol=1e-9)


def test_prefill_then_decode_continues_sequence():
    q, k, v, ke, ve = make(2, 2, 40, 16, 16, 8, seed=3)
    y_full = naive_pla(q, k, v, ke, ve)
    _, st = pla_prefill(q[:, :, :25], k[:, :, :25], v[:, :, :25], ke, ve)
    for i in range(25, 40):
        y = pla_decode_step(q[:, :, i], k[:, :, i], v[:, :, i], st)
        torch.testing.assert_close(y, y_full[:, :, i], rtol=1e-10, atol=1e-10)


def test_fp32_and_bf16_inputs_follow_fp64():
    q, k, v, ke, ve = make(1, 2, 300, 128, 16, 64, seed=5, scale=0.5)
    y64 = naive_pla(q, k, v, ke, ve)
    y32 = prefix_linear_attention(q.float(), k.float(), v.float(), ke.float(), ve.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)
    yb = prefix_linear_attention(*(t.bfloat16() for t in (q, k, v, ke, ve)))
    assert yb.dtype == torch.bfloat16
    assert (yb.double() - y64).abs().max() < 5e-2


def test_gradcheck():
    q, k, v, ke, ve = make(1, 2, 9, 5, 3, 2, seed=7)
    ins = [t.clone().requires_grad_() for t in (q, k, v, ke, ve)]
    fn = lambda *a: pla_reference(*a, chunk=4)
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7)
    # and gradients of the chunked form equal those of the naive equation
    g = torch.randn(1, 2, 9, 2, dtype=torch.float64)
    a = torch.autograd.grad((fn(*ins) * g).sum(), ins)
    b = torch.autograd.grad((naive_pla(*ins) * g).sum(), ins)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("N,M", [(20, 12), (20, 20), (10, 12)])
def test_key_mask_equals_unpadded(N, M):
    """Left padding with a mask == running on the unpadded sequence (encoder region shrinks)."""
    B, H, f, dv = 2, 2, 16, 4
    pads = [3, 0]
    q, k, v, ke, ve = make(B, H, N, M, f, dv, seed=11)
    mask = torch.ones(B, max(N, M), dtype=torch.bool)  # covers the encoder region when M > N
    for b, p in enumerate(pads):
        mask[b, :p] = False
    y, st = pla_prefill(q, k, v, ke, ve, key_mask=mask)
    y_rec, st_rec = pla_recurrent(q, k, v, ke, ve, key_mask=mask)
    y_naive = naive_pla(q, k, v, ke, ve, key_mask=mask.double())
    torch.testing.assert_close(y, y_naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_rec, y_naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.S, st_rec.S, rtol=1e-10, atol=1e-9)
    for b, p in enumerate(pads):
        sl = lambda t: t[b : b + 1, :, p:]
        yu, stu = pla_prefill(sl(q), sl(k), sl(v), ke[b : b + 1, :, p:M], ve[b : b + 1, :, p:M])
        torch.testing.assert_close(y[b : b + 1, :, p:], yu, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(st.S[b : b + 1], stu.S, rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(st.z[b : b + 1], stu.z, rtol=1e-10, atol=1e-9)
    # masked outputs and the gradients stay finite
    ins = [t.clone().requires_grad_() for t in (q, k, v, ke, ve)]
    prefix_linear_attention(*ins, key_mask=mask).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in ins)


def test_encoder_state_mask():
    _, _, _, ke, ve = make(2, 1, 1, 6, 4, 3, seed=2)
    mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    st = encoder_state(ke, ve, mask)
    ref = encoder_state(ke[:1, :, 2:], ve[:1, :, 2:])
    torch.testing.assert_close(st.S[:1], ref.S)
    torch.testing.assert_close(st.z[:1], ref.z)
    assert isinstance(st, PLAState) and st.S.shape == (2, 1, 21, 3)


def test_memory_sane_training_shape():
    """N = 2048, dv = 64 runs in the parallel form (fp32) with a backward."""
    q, k, v, ke, ve = make(1, 1, 2048, 1024, 16, 64, dtype=torch.float32, scale=0.3)
    ins = [t.requires_grad_() for t in (q, k, v, ke, ve)]
    y = prefix_linear_attention(*ins)
    y.sum().backward()
    assert torch.isfinite(q.grad).all()
