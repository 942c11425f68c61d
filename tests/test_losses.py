"""Balance losses and the router z-loss: values at uniform and collapsed routing, Shazeer's smooth
load estimator against a Monte-Carlo count, and the per-layer (not pooled) averaging."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from moe_lm.config import MoEConfig, ModelConfig
from moe_lm.model import losses
from moe_lm.model.routing import NoisyTopK, Routing
from moe_lm.model.transformer import Transformer


def routing_from_probs(probs: torch.Tensor, k: int = 1) -> Routing:
    """A token-choice Routing whose assignments are the top-k of the given probabilities."""
    top_p, top_idx = probs.topk(k, dim=-1)
    T = probs.shape[0]
    return Routing(torch.arange(T).repeat_interleave(k), top_idx.reshape(-1), top_p.reshape(-1),
                   top_p.reshape(-1), torch.log(probs), probs, k)


def mixed_probs(T: int, E: int, collapse: float) -> torch.Tensor:
    """Tokens spread round-robin over the experts (collapse = 0), or all on expert 0 (collapse = 1)."""
    favourite = torch.arange(T) % E
    spread = torch.full((T, E), 0.1 / (E - 1))
    spread[torch.arange(T), favourite] = 0.9
    collapsed = torch.full((T, E), 0.1 / (E - 1))
    collapsed[:, 0] = 0.9
    n_collapsed = int(round(collapse * T))
    return torch.cat([collapsed[:n_collapsed], spread[n_collapsed:]])


def test_switch_loss_is_one_at_perfect_balance_n_when_collapsed_and_grows_in_between():
    E, T = 4, 64
    uniform = routing_from_probs(torch.full((T, E), 1 / E) + torch.eye(E).repeat(T // E, 1) * 1e-6)
    assert losses.switch_loss(uniform, E).item() == pytest.approx(1.0, abs=1e-4)  # α · N · Σ 1/N · 1/N
    values = [losses.switch_loss(routing_from_probs(mixed_probs(T, E, c)), E).item() for c in (0, 0.25, 0.5, 1.0)]
    assert values == sorted(values) and values[0] == pytest.approx(1.0, abs=1e-6)
    assert values[-1] == pytest.approx(E * 0.9)  # all on expert 0: N · 1 · 0.9


def test_switch_loss_gradient_flows_through_the_mean_probability_only():
    probs = torch.softmax(torch.randn(16, 4), -1).requires_grad_(True)
    r = routing_from_probs(probs)
    losses.switch_loss(r, 4).backward()
    f = torch.bincount(r.expert, minlength=4).float() / 16
    torch.testing.assert_close(probs.grad, (4 * f / 16).expand(16, 4))


def test_cv_squared_is_population_variance_over_mean_squared():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert losses.cv_squared(x).item() == pytest.approx(x.var(unbiased=False).item() / 3.0**2)
    assert losses.cv_squared(torch.ones(5)).item() == 0.0


def shazeer_routing(seed: int, collapse_bias: float = 0.0, T: int = 64, E: int = 4, k: int = 2) -> Routing:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = NoisyTopK(8, MoEConfig(n_experts=E, top_k=k, router="noisy_topk", balance_loss="shazeer"))
    with torch.no_grad():
        r.w_gate.normal_(std=0.01)
        r.w_gate[0] += collapse_bias
        r.w_noise.normal_(std=0.01)
    x = torch.randn(T, 8).abs()
    return r(x)


def test_shazeer_loss_is_near_zero_when_balanced_and_high_when_collapsed():
    E = 4
    balanced = losses.shazeer_loss(shazeer_routing(0), E).item()
    collapsed = losses.shazeer_loss(shazeer_routing(0, collapse_bias=3.0), E).item()
    assert balanced < 0.05
    assert collapsed > 20 * max(balanced, 1e-3)


def test_kth_excluding_is_the_kth_largest_of_the_other_entries():
    torch.manual_seed(0)
    h = torch.randn(7, 6)
    got = losses.kth_excluding(h, 2)
    for t in range(7):
        for i in range(6):
            others = torch.cat([h[t, :i], h[t, i + 1:]])
            assert got[t, i] == torch.sort(others, descending=True).values[1]


def test_shazeer_load_estimator_matches_a_monte_carlo_count_of_top_k_membership():
    """Appendix A: P(x, i) = probability that expert i is in the top k when ITS noise is drawn
    again, the other experts' noise held at the sampled values. Count it: redraw only element i's
    noise many times, put it back into the noisy logit vector, and ask torch.topk."""
    torch.manual_seed(0)
    T, E, k, S = 12, 6, 2, 4000
    clean = torch.randn(T, E)
    std = torch.rand(T, E) * 1.5 + 0.2
    noisy = clean + torch.randn(T, E) * std
    P = losses.smooth_load(clean, noisy, std, k)
    counted = torch.zeros(T, E)
    for i in range(E):
        draws = clean[:, i] + torch.randn(S, T) * std[:, i]  # (S, T)
        h = noisy.expand(S, T, E).clone()
        h[:, :, i] = draws
        in_top = (h.topk(k, dim=-1).indices == i).any(-1)  # (S, T)
        counted[:, i] = in_top.float().mean(0)
    mae = (P - counted).abs().mean().item()
    assert mae < 0.02, mae
    assert (P - counted).abs().max().item() < 0.06


def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.randn(10, 5)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert losses.z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_entropy_of_uniform_routing_is_log_n():
    assert losses.entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8))


# ---------------------------------------------------------------------------------------------
# per layer, not pooled


def collapsed_model(router: str, balance: str, experts_per_layer: list[int]) -> Transformer:
    """A 2-layer MoE model whose layer i sends (nearly) every token to expert experts_per_layer[i].

    Every token embedding shares a large component along one direction u, so every token's hidden
    state points along u; each layer's router scores its chosen expert by u."""
    torch.manual_seed(0)
    E, d = 4, 32
    cfg = ModelConfig(vocab_size=40, d_model=d, n_layers=2, n_heads=4, ffn_hidden=16, seq_len=16,
                      moe=MoEConfig(n_experts=E, top_k=2 if router == "noisy_topk" else 1, router=router,
                                    balance_loss=balance, balance_coef=0.5))  # 2 layers, summed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Transformer(cfg)
    u = torch.zeros(d)
    u[0] = 1.0
    with torch.no_grad():
        model.embed_tokens.weight.add_(3.0 * u)
        for layer, e in zip(model.moe_layers(), experts_per_layer):
            gate = layer.router.w_gate if router == "noisy_topk" else layer.router.weight
            gate.zero_()
            gate[e] = 10.0 * u
    return model


@pytest.mark.parametrize("router,balance", [("switch", "switch"), ("noisy_topk", "shazeer")])
def test_two_layers_collapsed_onto_different_experts_score_high_the_pooled_trap(router, balance):
    idx = torch.randint(0, 40, (4, 16))
    trap = collapsed_model(router, balance, [0, 1])
    same = collapsed_model(router, balance, [0, 0])
    out_trap, out_same = trap(idx), same(idx)
    loads = [s.load for s in out_trap.moe_stats]
    assert loads[0].argmax() == 0 and loads[1].argmax() == 1  # each layer collapsed, differently
    # pooled over the two layers the load looks half-balanced; per layer both are collapsed
    pooled = torch.stack(loads).sum(0)
    assert pooled[0] == pytest.approx(pooled[1].item(), rel=0.05)
    balanced_model = collapsed_model(router, balance, [0, 1])
    with torch.no_grad():
        for layer in balanced_model.moe_layers():
            for p in layer.router.parameters():
                p.zero_()
    out_balanced = balanced_model(idx)
    assert out_trap.aux_loss.item() == pytest.approx(out_same.aux_loss.item(), rel=0.05)
    assert out_trap.aux_loss.item() > 3 * out_balanced.aux_loss.item()
    if balance == "switch":
        assert out_trap.aux_loss.item() == pytest.approx(4.0, rel=0.01)  # N when collapsed
        assert out_balanced.aux_loss.item() == pytest.approx(1.0, rel=0.2)
        # the same numbers pooled over layers: f = P = (1/2, 1/2, 0, 0) -> N · 1/2 = 2, "better"
        f = pooled / pooled.sum()
        assert 4 * (f * f).sum().item() == pytest.approx(2.0, rel=0.05)


def test_model_losses_are_sums_over_the_layers_of_each_layers_loss_times_the_coefficient():
    """The papers' convention (Shazeer's w, Switch's 0.01, tensor2tensor adds the layers' losses):
    a coefficient is per layer, and the layers' losses are summed, not averaged."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, ffn_hidden=16, seq_len=16,
                      moe=MoEConfig(n_experts=4, top_k=2, balance_coef=0.5, z_loss_coef=0.25))
    model = Transformer(cfg)
    idx = torch.randint(0, 40, (2, 16))
    out = model(idx, idx)
    layers = model.moe_layers()
    assert len(out.moe_stats) == 3
    # recompute each layer's losses from its router on its own input, by hand
    captured = []
    hooks = [layer.register_forward_hook(lambda m, inp, o: captured.append(inp[0].reshape(-1, 32))) for layer in layers]
    model(idx, idx)
    for h in hooks:
        h.remove()
    bal, z = [], []
    for layer, x in zip(layers, captured):
        logits = x @ layer.router.weight.t()
        p = torch.softmax(logits, -1)
        top = p.topk(2, -1).indices.reshape(-1)
        f = torch.bincount(top, minlength=4).float() / top.numel()
        bal.append(0.5 * 4 * (f * p.mean(0)).sum())
        z.append(0.25 * (torch.logsumexp(logits, -1) ** 2).mean())
    # the hand sum: layer losses x coefficient, added (the mean would be a third of it)
    torch.testing.assert_close(out.aux_loss, bal[0] + bal[1] + bal[2])
    torch.testing.assert_close(out.z_loss, z[0] + z[1] + z[2])
    for s, b, zz in zip(out.moe_stats, bal, z):
        torch.testing.assert_close(s.balance_loss, b)
        torch.testing.assert_close(s.z_loss, zz)
    for s in out.moe_stats:
        assert not s.load.requires_grad and s.balance_loss.requires_grad
