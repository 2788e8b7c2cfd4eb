import math

import pytest
import torch

from moetrain.moe.aux_losses import attach_aux_loss, load_balancing_loss, z_loss
from moetrain.moe.config import MoEConfig
from moetrain.moe.layer import MoELayer
from moetrain.moe.reference import reference_aux_loss

# T=4 tokens, E=3, K=2. Counts [3, 3, 2] of 8: f = [3/8, 3/8, 1/4]; P = [.375, .325, .3].
PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
IDS = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])


def balance_loss(probs_TE, ids_TK, coeff):
    """coeff * E * sum_i f_i * P_i, written out expert by expert."""
    E = probs_TE.shape[1]
    flat = ids_TK.flatten().tolist()
    f = [flat.count(i) / len(flat) for i in range(E)]
    P = probs_TE.mean(0)
    return coeff * E * sum(f[i] * P[i] for i in range(E))


def test_micro_batch_hand_example():
    probs = PROBS.clone().requires_grad_()
    loss = load_balancing_loss(probs, IDS, coeff=0.1)
    # 0.1 * 3 * (3/8 * .375 + 3/8 * .325 + 1/4 * .3) = 0.1 * 3 * 0.3375
    torch.testing.assert_close(loss, torch.tensor(0.10125))
    (grad,) = torch.autograd.grad(loss, probs)
    # f is a constant: d loss / d probs[t, i] = coeff * E * f_i / T
    want = torch.tensor([0.1 * 3 * f / 4 for f in (3 / 8, 3 / 8, 1 / 4)]).expand(4, 3)
    torch.testing.assert_close(grad, want)


def test_micro_batch_ignores_given_counts():
    loss = load_balancing_loss(PROBS, IDS, 0.1, counts_E=torch.ones(3))
    torch.testing.assert_close(loss, torch.tensor(0.10125))


def test_sequence_hand_example():
    # seq 0 = tokens 0, 1: f = [1/4, 1/2, 1/4], P = [.3, .45, .25] -> 0.3625
    # seq 1 = tokens 2, 3: f = [1/2, 1/4, 1/4], P = [.45, .2, .35] -> 0.3625
    loss = load_balancing_loss(PROBS, IDS, coeff=0.1, scope="sequence", seq_len=2)
    torch.testing.assert_close(loss, torch.tensor(0.1 * 3 * 0.3625))


@pytest.mark.parametrize("seed", range(3))
def test_sequence_scope_is_mean_over_sequences(seed):
    B, S, E, K = 3, 5, 4, 2
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(B * S, E, generator=g).softmax(-1)
    ids = torch.rand(B * S, E, generator=g).argsort(-1)[:, :K]
    loss = load_balancing_loss(probs, ids, 0.01, scope="sequence", seq_len=S)
    per_seq = [
        balance_loss(probs[b * S : (b + 1) * S], ids[b * S : (b + 1) * S], 0.01) for b in range(B)
    ]
    torch.testing.assert_close(loss, sum(per_seq) / B)
    # and it is not the micro-batch value
    assert not torch.allclose(loss, balance_loss(probs, ids, 0.01))


def test_sequence_scope_needs_sequences():
    with pytest.raises(ValueError, match="aux_loss_scope"):
        load_balancing_loss(PROBS, IDS, 0.1, scope="sequence")
    cfg = MoEConfig(num_experts=4, top_k=2, dim=8, hidden_dim=16, aux_loss_scope="sequence")
    with pytest.raises(ValueError, match="aux_loss_scope"):
        MoELayer(cfg)(torch.randn(6, 8))


def test_global_scope_with_given_counts():
    other_ids = torch.tensor([[2, 1], [2, 0]])  # another rank's counts [1, 1, 2]
    union_counts = torch.tensor([3.0, 3.0, 2.0]) + torch.tensor([1.0, 1.0, 2.0])
    loss = load_balancing_loss(PROBS, IDS, 0.1, scope="global", counts_E=union_counts)
    # union counts [4, 4, 4]: f = 1/3 each; P local = [.375, .325, .3] sums to 1
    torch.testing.assert_close(loss, torch.tensor(0.1))
    # the same through the generic formula: f over both batches, P over the local one
    union = torch.cat([IDS, other_ids])
    flat = union.flatten().tolist()
    f = [flat.count(i) / len(flat) for i in range(3)]
    want = 0.1 * 3 * sum(f[i] * PROBS[:, i].mean() for i in range(3))
    torch.testing.assert_close(loss, want)


def test_global_scope_without_counts_is_micro_batch():
    loss = load_balancing_loss(PROBS, IDS, 0.1, scope="global")
    torch.testing.assert_close(loss, torch.tensor(0.10125))


def test_z_loss():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.e + math.e**2 + math.e**3), math.log(3)]
    want = 0.01 * (lse[0] ** 2 + lse[1] ** 2) / 2
    torch.testing.assert_close(z_loss(logits, 0.01), torch.tensor(want))


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_attach_aux_loss(scale):
    w = torch.randn(5, requires_grad=True)
    g = torch.randn(5)
    out = 2 * w
    y = attach_aux_loss(out, (w**3).sum(), scale)
    assert torch.equal(y, 2 * w.detach())
    (grad,) = torch.autograd.grad((y * g).sum(), w)
    # d/dw [(2w * g).sum() + scale * (w^3).sum()] = 2 g + 3 scale w^2
    torch.testing.assert_close(grad, 2 * g + 3 * scale * w.detach() ** 2)


def test_attach_aux_loss_without_grad_is_identity():
    out = torch.randn(3, requires_grad=True)
    assert attach_aux_loss(out, torch.tensor(1.0)) is out


def make_layers(*loss_kws, **kw):
    """Layers with identical weights, one per dict of loss options."""
    layers = []
    for loss_kw in loss_kws:
        cfg = MoEConfig(num_experts=4, top_k=2, dim=8, hidden_dim=16, **loss_kw, **kw)
        layers.append(MoELayer(cfg).eval())
    layers[0].router.reset_parameters(std=0.5)
    for layer in layers[1:]:
        layer.load_state_dict(layers[0].state_dict())
    return layers


@pytest.mark.parametrize(
    ("loss_kw", "kw", "shape", "scale"),
    [
        (dict(aux_loss_coeff=0.5), dict(), (12, 8), 1.0),
        (dict(aux_loss_coeff=0.5), dict(), (12, 8), 0.5),
        (dict(aux_loss_coeff=0.5), dict(aux_loss_scope="sequence"), (3, 4, 8), 1.0),
        (dict(aux_loss_coeff=0.5, z_loss_coeff=0.1), dict(score_func="sigmoid"), (3, 4, 8), 1.0),
        (dict(aux_loss_coeff=0.0, z_loss_coeff=0.1), dict(), (12, 8), 1.0),
    ],
)
def test_layer_output_backward_carries_aux_gradient(loss_kw, kw, shape, scale):
    with_aux, without = make_layers(loss_kw, dict(aux_loss_coeff=0.0), **kw)
    with_aux.aux_loss_scale = scale
    x = torch.randn(shape)
    g = torch.randn(shape)
    w = with_aux.router.weight_ED
    (grad_with,) = torch.autograd.grad((with_aux(x) * g).sum(), w)
    (grad_without,) = torch.autograd.grad((without(x) * g).sum(), without.router.weight_ED)
    routed = with_aux.router(x.reshape(-1, 8))
    seq_len = shape[1] if len(shape) == 3 else None
    (grad_aux,) = torch.autograd.grad(reference_aux_loss(with_aux, routed, seq_len), w)
    assert grad_aux.norm() > 10 * (grad_with - grad_without - scale * grad_aux).norm()
    torch.testing.assert_close(grad_with, grad_without + scale * grad_aux, rtol=1e-4, atol=1e-6)


def test_aux_loss_coeff_per_layer():
    kw = dict(num_experts=4, top_k=2, dim=8, hidden_dim=16, aux_loss_coeff_per_layer=[0.01, 0.03])
    first, second = MoELayer(MoEConfig(**kw), layer_idx=0), MoELayer(MoEConfig(**kw), layer_idx=1)
    second.load_state_dict(first.state_dict())
    assert (first.aux_coeff, second.aux_coeff) == (0.01, 0.03)
    x = torch.randn(10, 8)
    first(x)
    second(x)
    routed = first.router(x)
    torch.testing.assert_close(
        second.last_stats.aux_loss, balance_loss(routed.probs_TE, routed.topk_ids_TK, 0.03)
    )
    torch.testing.assert_close(second.last_stats.aux_loss, 3 * first.last_stats.aux_loss)
    with pytest.raises(ValueError, match="aux_loss_coeff_per_layer"):
        MoELayer(MoEConfig(**kw), layer_idx=2)


def test_last_stats_losses_detached():
    (layer,) = make_layers(dict(aux_loss_coeff=0.02, z_loss_coeff=0.001))
    x = torch.randn(10, 8)
    layer(x)
    stats = layer.last_stats
    routed = layer.router(x)
    for value in (stats.aux_loss, stats.z_loss):
        assert not value.requires_grad and value.grad_fn is None and value.shape == ()
    torch.testing.assert_close(
        stats.aux_loss, balance_loss(routed.probs_TE, routed.topk_ids_TK, 0.02).detach()
    )
    lse = [math.log(sum(math.exp(v) for v in row)) for row in routed.logits_TE.tolist()]
    want_z = 0.001 * sum(v * v for v in lse) / len(lse)
    torch.testing.assert_close(stats.z_loss, torch.tensor(want_z))
    assert float(stats.aux_loss) > 0 and float(stats.z_loss) > 0


def test_layer_global_scope_uses_reduce_global_counts():
    (layer,) = make_layers(dict(aux_loss_coeff=0.1, aux_loss_scope="global"))
    other_counts = torch.tensor([5.0, 0.0, 1.0, 2.0])
    layer.reduce_global_counts = lambda c: c + other_counts
    x = torch.randn(6, 8)
    layer(x)
    routed = layer.router(x)
    local = torch.bincount(routed.topk_ids_TK.flatten(), minlength=4).float()
    f = (local + other_counts) / 20  # 12 local + 8 remote assignments
    want = 0.1 * 4 * (f * routed.probs_TE.mean(0)).sum()
    torch.testing.assert_close(layer.last_stats.aux_loss, want.detach())
    assert not torch.allclose(
        layer.last_stats.aux_loss, balance_loss(routed.probs_TE, routed.topk_ids_TK, 0.1).detach()
    )
