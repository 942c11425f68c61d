"""model.gemm: float32 CPU matmuls through oneDNN, checked against float64 products written out with
torch.mm / F.linear in double precision (another library: torch's own double kernels), and the rule
that picks the library."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.checks import cpu_matmul
from moe_lm.device import resolve_device
from moe_lm.errors import ConfigError
from moe_lm.model import gemm

needs_onednn = pytest.mark.skipif(not gemm._onednn_runs(), reason="this torch has no oneDNN linear for plain tensors")


@pytest.fixture
def onednn(monkeypatch):
    """Products of float32 CPU tensors go to oneDNN for the test, whatever this machine's rule says.
    -> the list of oneDNN products made (one entry per call), so a test can see that it ran."""
    monkeypatch.setattr(gemm, "backend", lambda: "onednn")
    calls, real = [], gemm._xwt
    monkeypatch.setattr(gemm, "_xwt", lambda x, w: calls.append(1) or real(x, w))
    return calls


def close(got: torch.Tensor, want64: torch.Tensor) -> None:
    """float32 against the float64 product: within float32 rounding of sums of this size."""
    assert got.dtype == torch.float32 and got.shape == want64.shape
    assert torch.allclose(got.double(), want64, rtol=1e-4, atol=1e-4 * want64.abs().max().item()), \
        (got.double() - want64).abs().max()


def views():
    """(name, a, b, oneDNN products per call) for each layout gemm.mm turns around: row-major, a
    transposed (a weight gradient: a^T g, with the copied side the smaller either way), b
    column-major; and a transposed a whose product is too small for the copy (torch.mm: at least
    gemm.COPY_MIN_MACS = 128 multiply-adds per copied element, i.e. the other side 128 wide)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [
        ("row-major", r(300, 64), r(64, 48), 1),
        ("b transposed", r(300, 64), r(48, 64).t(), 1),
        ("a transposed, b wider", r(300, 40).t(), r(300, 160), 1),  # copies a^T: (40, 300) < (300, 160)'s
        ("a transposed, b narrower", r(300, 160).t(), r(300, 8), 1),  # copies b^T (8, 300), result transposed
        ("both transposed", r(300, 64).t(), r(48, 300).t(), 1),
        ("a transposed, b 127 wide: no copy", r(300, 40).t(), r(300, 127), 0),
        ("a transposed, a 127 high: no copy", r(300, 127).t(), r(300, 8), 0),
    ]


@needs_onednn
@pytest.mark.parametrize("name, a, b, products", views(), ids=[v[0] for v in views()])
def test_mm_is_the_product(name, a, b, products, onednn):
    assert gemm.applies(a, b)
    close(gemm.mm(a, b), a.double() @ b.double())
    out = torch.full((a.shape[0], b.shape[1]), float("nan"))
    assert gemm.mm(a, b, out=out) is out
    close(out, a.double() @ b.double())
    assert len(onednn) == 2 * products


@needs_onednn
def test_mm_that_autograd_records_is_torchs_and_keeps_its_gradient(onednn):
    """oneDNN's op has no autograd: a product autograd would record goes to torch.mm, so no
    gradient is silently lost."""
    a, b = torch.randn(5, 4, requires_grad=True), torch.randn(4, 3)
    gemm.mm(a, b).sum().backward()
    assert not onednn
    close(a.grad, b.double().sum(1).expand(5, 4))
    with torch.no_grad():
        gemm.mm(a, b)
    assert len(onednn) == 1


@needs_onednn
def test_mm_with_an_empty_side_is_torchs(onednn):
    a, b = torch.randn(0, 5), torch.randn(5, 3)
    assert gemm.mm(a, b).shape == (0, 3)
    assert torch.equal(gemm.mm(b.t()[:, :0], torch.randn(0, 4)), torch.zeros(3, 4))  # a sum over nothing


@needs_onednn
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)], ids=["both", "x", "w"])
def test_linear_value_and_gradients_are_f_linears(grads, onednn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 33, 24, generator=g).requires_grad_(grads[0])
    w = torch.randn(160, 24, generator=g).requires_grad_(grads[1])  # 160 wide: dw = g^T x copies x
    up = torch.randn(4, 33, 160, generator=g)
    y = gemm.linear(x, w)
    (y * up).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.linear(x64, w64)
    (y64 * up.double()).sum().backward()
    close(y.detach(), y64.detach())
    assert len(onednn) == 1 + sum(grads)  # the forward, then one product per gradient
    if grads[0]:
        close(x.grad, x64.grad)
    if grads[1]:
        close(w.grad, w64.grad)


def test_linear_module_is_nn_linears_layout():
    torch.manual_seed(0)
    ours = gemm.Linear(6, 5, bias=True)
    torch.manual_seed(0)
    theirs = nn.Linear(6, 5, bias=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(ours.state_dict()[k], theirs.state_dict()[k]) for k in ours.state_dict())
    x = torch.randn(3, 6)
    close(ours(x).detach(), F.linear(x.double(), theirs.weight.double(), theirs.bias.double()).detach())


@needs_onednn
def test_only_float32_cpu_tensors_outside_autocast_go_to_onednn(onednn):
    x = torch.randn(4, 4)
    assert gemm.applies(x, x)
    assert not gemm.applies(x.bfloat16(), x.bfloat16()) and not gemm.applies(x.double(), x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.applies(x, x)
        assert gemm.linear(x, x).dtype == torch.bfloat16  # F.linear's autocast cast, as before


@pytest.mark.parametrize("vendor, capability, want", [
    ("AuthenticAMD", "AVX512", "onednn"),  # MKL's AVX2 kernels on an AVX-512 CPU: measured 2x slower
    ("GenuineIntel", "AVX512", "blas"),  # MKL's own AVX-512 kernels
    ("AuthenticAMD", "AVX2", "blas"),  # the same vector width either way
    ("HygonGenuine", "AVX512", "onednn"),  # AMD's design
    ("i386", "AVX512", "blas"),  # a vendor not known (macOS's platform.processor())
])
def test_auto_takes_onednn_only_where_mkl_leaves_avx512_unused(vendor, capability, want, monkeypatch):
    monkeypatch.delenv("MOE_LM_CPU_MATMUL", raising=False)
    monkeypatch.setattr(gemm, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(gemm, "_onednn_runs", lambda: True)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    gemm.backend.cache_clear()
    try:
        assert gemm.backend() == want
        monkeypatch.setenv("MOE_LM_CPU_MATMUL", "blas")
        gemm.backend.cache_clear()
        assert gemm.backend() == "blas"
        monkeypatch.setenv("MOE_LM_CPU_MATMUL", " oneDNN ")
        gemm.backend.cache_clear()
        assert gemm.backend() == "onednn"
        monkeypatch.setattr(gemm, "_onednn_runs", lambda: False)  # a torch without it: its BLAS
        gemm.backend.cache_clear()
        assert gemm.backend() == "blas"
    finally:
        gemm.backend.cache_clear()


def test_a_bad_setting_is_a_config_error_naming_the_choices(monkeypatch):
    monkeypatch.setenv("MOE_LM_CPU_MATMUL", "openblas")
    with pytest.raises(ConfigError, match="MOE_LM_CPU_MATMUL='openblas'.*auto, onednn, blas"):
        cpu_matmul()
    with pytest.raises(ConfigError):
        resolve_device("cpu", "float32")  # every command that resolves its device refuses it first
    monkeypatch.setenv("MOE_LM_CPU_MATMUL", "")
    assert cpu_matmul() == "auto"


@needs_onednn
def test_a_training_step_through_onednn_is_the_blas_steps_up_to_rounding(monkeypatch):
    """The Transformer (an MoE block and a dense one, the fused head and loss): loss and every
    gradient as with torch's own matmuls, to float32 rounding."""
    from moe_lm.config import load_config
    from moe_lm.model.transformer import Transformer

    cfg = load_config("configs/tiny-moe.yaml", ["model.vocab_size=256", "model.seq_len=32", "model.moe.every=2"])
    idx = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    grads, calls, real = {}, [], gemm._xwt
    monkeypatch.setattr(gemm, "_xwt", lambda x, w: calls.append(1) or real(x, w))
    for name in ("blas", "onednn"):
        monkeypatch.setattr(gemm, "backend", lambda name=name: name)
        calls.clear()
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + out.aux_loss + out.z_loss).backward()
        grads[name] = (out.loss.item(), {n: p.grad for n, p in model.named_parameters()})
        # the forward and input-gradient products of every projection, the router and the fused
        # head went to oneDNN (or none of them did); these 64-wide layers' weight gradients stay
        # torch's (gemm.COPY_MIN_MACS)
        assert (len(calls) >= 2 * (4 * 2 + 3 + 1)) if name == "onednn" else not calls, (name, len(calls))
    (loss_b, g_b), (loss_o, g_o) = grads["blas"], grads["onednn"]
    assert loss_o == pytest.approx(loss_b, rel=1e-5)
    for n, g in g_b.items():
        assert torch.allclose(g_o[n], g, rtol=1e-3, atol=1e-3 * g.abs().max().item()), n
