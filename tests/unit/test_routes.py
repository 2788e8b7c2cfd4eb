"""Routing research I (moetrain.moe.routes): null experts (AdaMoE), zero-computation experts and
gating residuals (MoE++), top-p routing, expert-choice routing.

Hand-computed cases for each selection rule and output, then every option in the layer against
the naive reference (moetrain.moe.reference_routes), output and gradients."""

from __future__ import annotations

import warnings

import pytest
import torch

from moetrain.moe import MoEConfig, MoELayer
from moetrain.moe.reference_routes import reference_routes
from moetrain.moe.routes import (
    LogitChain,
    NonCausalRoutingWarning,
    ZeroComputeExperts,
    balance_terms,
    combine_weights,
    expert_choice_select,
    kind_counts,
    research_options,
    route_kind,
    top_p_select,
)

D = 16


def moe(**kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, dim=D, hidden_dim=24, aux_loss_coeff=0.01)
    base.update(kw)
    return MoEConfig(**base)


# --- hand-computed cases ---------------------------------------------------------------------


def test_top_p_takes_experts_until_the_mass_reaches_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25] * 4])
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    ids, active = top_p_select(moe(top_p=0.7), order, probs)
    assert ids.shape == (3, 4)  # max_k null: every route
    assert active.sum(-1).tolist() == [2, 2, 3]  # 0.5+0.3 >= 0.7; 0.25*3 >= 0.7
    assert ids[0, :2].tolist() == [0, 1] and ids[1, :2].tolist() == [3, 2]
    # the mass before a route must stay below p: at exactly p the next route is not taken
    assert top_p_select(moe(top_p=0.5), order, probs)[1].sum(-1).tolist() == [1, 1, 2]
    # bounds
    assert top_p_select(moe(top_p=0.5, min_k=2), order, probs)[1].sum(-1).tolist() == [2, 2, 2]
    ids, active = top_p_select(moe(top_p=0.99, max_k=2), order, probs)
    assert ids.shape == (3, 2) and active.all()


def test_expert_choice_picks_each_experts_best_tokens_per_scope():
    # 2 sequences of 3 tokens, 2 experts; C = ceil(1.0 * 3 * 1 / 2) = 2 per sequence
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5], [0.7, 0.3]])
    cfg = moe(num_experts=2, top_k=1, capacity_factor=1.0, min_capacity=0, expert_choice="sequence")
    ids, active, rows = expert_choice_select(cfg, probs, seq_len=3)
    assert rows == 4 and ids.tolist() == [[0, 1]] * 6
    # expert 0: tokens 0, 1 of sequence 0; tokens 5, 3 (0.5 tie: the earlier token) of sequence 1
    # expert 1: tokens 2, 1; tokens 3, 4
    assert active.tolist() == [
        [True, False],
        [True, True],
        [False, True],
        [True, True],
        [False, True],
        [True, False],
    ]
    cfg = moe(
        num_experts=2, top_k=1, capacity_factor=1.0, min_capacity=0, expert_choice="micro_batch"
    )
    _, active, rows = expert_choice_select(cfg, probs, seq_len=3)
    assert rows == 3  # C = ceil(6 / 2)
    assert active[:, 0].nonzero().flatten().tolist() == [0, 1, 5]
    assert active[:, 1].nonzero().flatten().tolist() == [2, 3, 4]


def test_null_experts_take_no_share_of_the_renormalized_weight():
    cfg = moe(num_null_experts=2)  # routes 0-3 FFN, 4-5 null
    scores = torch.tensor([[0.4, 0.35, 0.25], [0.6, 0.3, 0.1]])
    ids = torch.tensor([[0, 4, 2], [5, 4, 1]])
    w = combine_weights(cfg, scores, ids, None)
    torch.testing.assert_close(w[0, [0, 2]], torch.tensor([0.4 / 0.65, 0.25 / 0.65]))
    torch.testing.assert_close(w[1, 2], torch.tensor(1.0))  # the only FFN slot of token 1
    active = torch.tensor([[True, True, False], [True, True, True]])
    w = combine_weights(cfg, scores, ids, active)
    assert w[0, 2] == 0 and w[0, 0] == pytest.approx(1.0) and w[0, 1] == 0  # null: weight 0


def test_route_kinds_and_counts():
    cfg = moe(num_null_experts=1, num_zero_experts=1, num_copy_experts=2, num_constant_experts=1)
    ids = torch.tensor([[0, 3, 4, 5], [6, 7, 8, 1]])
    assert route_kind(cfg, ids).tolist() == [[0, 0, 1, 2], [3, 3, 4, 0]]
    active = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert kind_counts(cfg, ids, active).tolist() == [3, 1, 0, 2, 1]


def test_copy_and_constant_experts_by_hand():
    cfg = moe(num_copy_experts=1, num_constant_experts=2)  # copy 4, constants 5 and 6
    zc = ZeroComputeExperts(cfg)
    with torch.no_grad():
        zc.vectors_ND.copy_(torch.arange(2 * D, dtype=torch.float32).view(2, D))
        zc.gate_N2D.zero_()
        zc.gate_N2D[1, 0, 0] = 1.0  # constant 6: a = softmax([x_0, 0])
    x = torch.randn(3, D)
    ids = torch.tensor([[4, 0], [5, 6], [1, 2]])
    w = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    out = zc(x, ids, w)
    a = torch.softmax(torch.stack([x[1, 0], torch.tensor(0.0)]), 0)
    want1 = 0.4 * (0.5 * x[1] + 0.5 * zc.vectors_ND[0]) + 0.6 * (
        a[0] * x[1] + a[1] * zc.vectors_ND[1]
    )
    torch.testing.assert_close(out[0], 0.7 * x[0])
    torch.testing.assert_close(out[1], want1.detach())
    torch.testing.assert_close(out[2], torch.zeros(D))


def test_balance_terms_pool_null_experts_and_weigh_zero_computation():
    cfg = moe(num_experts=2, num_null_experts=2, num_zero_experts=1, zero_compute_aux_weight=0.5)
    f = torch.tensor([0.2, 0.2, 0.4, 0.0, 0.2])
    P = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2])
    # null pool: f 0.2 each, P 0.2 each; zero expert weighs 0.5
    want = 0.2 * 0.1 + 0.2 * 0.3 + 2 * 0.2 * 0.2 + 0.5 * 0.2 * 0.2
    assert float(balance_terms(cfg, f, P)) == pytest.approx(want)


# --- the layer against the naive reference ---------------------------------------------------

OPTIONS = {
    "null": dict(num_null_experts=2, top_k=3),
    "null_capacity": dict(num_null_experts=3, top_k=3, capacity_factor=0.75, min_capacity=0),
    "zero_compute": dict(
        num_zero_experts=1,
        num_copy_experts=1,
        num_constant_experts=2,
        zero_compute_aux_weight=0.75,
    ),
    "zero_compute_capacity_position": dict(
        num_zero_experts=1,
        num_copy_experts=1,
        num_constant_experts=1,
        capacity_factor=1.0,
        min_capacity=0,
        drop_policy="position",
    ),
    "top_p": dict(top_p=0.6, max_k=3, entropy_loss_coeff=0.01, norm_topk_prob=False),
    "top_p_capacity_sequence_scope": dict(
        top_p=0.5, capacity_factor=1.0, min_capacity=0, aux_loss_scope="sequence"
    ),
    "top_p_null": dict(top_p=0.7, num_null_experts=2),
    "expert_choice_sequence": dict(
        expert_choice="sequence", capacity_factor=1.0, z_loss_coeff=1e-3
    ),
    "expert_choice_micro_batch": dict(expert_choice="micro_batch", capacity_factor=1.5),
    "sigmoid_null_scaled": dict(
        score_func="sigmoid", num_null_experts=2, routed_scaling_factor=2.0
    ),
}


def build(kw: dict, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCausalRoutingWarning)
        layer = MoELayer(moe(**kw), layer_idx=0)
    with torch.no_grad():  # sharper router scores: distinct choices, real drops
        layer.router.weight_ED.mul_(40)
    return layer


def grads(layer: MoELayer, x: torch.Tensor, out: torch.Tensor, aux: torch.Tensor | None):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    loss = (out * g).sum() + (0 if aux is None else aux)
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [torch.zeros_like(t) if v is None else v for t, v in zip([x, *params], got)]


@pytest.mark.parametrize("option", list(OPTIONS))
def test_layer_matches_the_naive_reference(option):
    layer = build(OPTIONS[option])
    x = torch.randn(2, 12, D, requires_grad=True)
    y = layer(x)
    y_ref, aux_ref, picked = reference_routes(layer, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        layer.last_stats.aux_loss + layer.last_stats.z_loss, aux_ref.float(), rtol=1e-5, atol=1e-7
    )
    got = grads(layer, x, y, None)  # the aux loss rides on y through autograd
    want = grads(layer, x, y_ref, aux_ref.float())
    for name, a, b in zip(["x", *[n for n, _ in layer.named_parameters()]], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # the statistics count what the reference picked
    E = layer.cfg.num_experts
    ffn_slots = sum(1 for slots in picked for e, _ in slots if e < E)
    stats = layer.last_stats
    kept = int(stats.num_assignments) - int(stats.num_dropped)
    assert kept == ffn_slots
    unrouted = sum(1 for slots in picked if not any(e < E for e, _ in slots))
    if stats.unrouted_tokens is not None:
        assert int(stats.unrouted_tokens) == unrouted


def test_every_option_is_live():
    """Each option changes the output (so the reference comparisons above can fail)."""
    x = torch.randn(2, 12, D)
    plain = build({})(x)
    for option, kw in OPTIONS.items():
        assert not torch.allclose(build(kw)(x), plain, atol=1e-4), option


def test_top_p_varies_the_width_and_null_experts_the_ffn_count():
    x = torch.randn(4, 16, D)
    layer = build(dict(top_p=0.6))
    layer(x)
    k = layer.last_stats.route_counts.sum() / layer.last_stats.num_tokens
    assert 1.0 < float(k) < 4.0
    layer = build(dict(num_null_experts=2, top_k=3))
    layer(x)
    counts = layer.last_stats.route_counts
    assert counts[1] > 0 and float(counts[0]) / layer.last_stats.num_tokens < 3


def test_gating_residual_adds_the_previous_layers_logits():
    cfg = moe(gating_residual=True, num_copy_experts=1)
    torch.manual_seed(0)
    first, second = MoELayer(cfg, layer_idx=0), MoELayer(cfg, layer_idx=1)
    assert first.router.residual_EE is None and second.router.residual_EE.abs().sum() == 0
    chain = LogitChain()
    first.logit_chain = second.logit_chain = chain
    with torch.no_grad():
        second.router.residual_EE.normal_(0, 5.0)
    x = torch.randn(2, 8, D, requires_grad=True)
    h = first(x)
    previous = chain.latest
    y = second(h)
    y_ref, _, _ = reference_routes(second, h, previous_logits=previous)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y_plain, _, _ = reference_routes(second, h)
    assert not torch.allclose(y, y_plain, atol=1e-4)  # the residual changed the routing
    # the gradient reaches the first router through the residual
    g_first = torch.autograd.grad(y.sum(), first.router.weight_ED)[0]
    second.logit_chain = None
    h2 = first(x)
    g_plain = torch.autograd.grad(second(h2).sum(), first.router.weight_ED)[0]
    assert not torch.allclose(g_first, g_plain)


def test_gating_residual_in_a_model_matches_under_activation_checkpointing():
    from moetrain.models.config import ModelConfig
    from moetrain.models.transformer import Transformer

    def model(ac: bool) -> Transformer:
        torch.manual_seed(0)
        m = Transformer(
            ModelConfig(
                vocab_size=64,
                dim=D,
                num_layers=3,
                num_heads=2,
                num_kv_heads=2,
                max_seq_len=16,
                first_k_dense=0,
                moe=moe(gating_residual=True, num_null_experts=1),
            )
        )
        for name, p in m.named_parameters():
            if "residual_EE" in name:
                torch.nn.init.normal_(p, std=1.0)
        for block in m.layers:
            block.activation_checkpointing = ac
        return m

    tokens = torch.randint(0, 64, (2, 16))
    plain, ckpt = model(False), model(True)
    for m in (plain, ckpt):
        for layer in m.moe_layers():
            layer.start_step(0)
        loss = m(tokens).square().mean()
        held = [len(layer._residual_inputs) for layer in m.moe_layers()]
        # kept for a recomputation only: the layers after the first, with checkpointing
        assert held == ([0, 1, 1] if m is ckpt else [0, 0, 0])
        loss.backward()
        # released once the recomputation has read them
        assert all(t is None for layer in m.moe_layers() for t in layer._residual_inputs)
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert any(p.grad.abs().sum() > 0 for n, p in plain.named_parameters() if "residual" in n)


def test_expert_choice_warns_once_per_model():
    with pytest.warns(NonCausalRoutingWarning, match="non-causal"):
        MoELayer(moe(expert_choice="sequence", capacity_factor=1.0), layer_idx=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoELayer(moe(expert_choice="sequence", capacity_factor=1.0), layer_idx=1)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        (dict(expert_choice="sequence", capacity_factor=1.0, router_type="hash"), "router_type"),
        (dict(expert_choice="sequence"), "expert_choice: needs model.moe.capacity_factor"),
        (dict(expert_choice="tokens", capacity_factor=1.0), "expert_choice: must be one of"),
        (dict(expert_choice="sequence", capacity_factor=1.0, top_p=0.5), "top_p"),
        (dict(expert_choice="sequence", capacity_factor=1.0, num_null_experts=1), "null"),
        (dict(expert_choice="sequence", capacity_factor=1.0, num_copy_experts=1), "copy"),
        (dict(entropy_loss_coeff=0.1, router_type="hash"), "router_type=learned"),
        (dict(num_copy_experts=1, top_k=9), "the 5 routes"),
        (dict(top_p=1.5), "top_p: must be in (0, 1]"),
        (dict(top_p=0.5, min_k=3, max_k=2), "max_k"),
        (dict(top_p=0.5, max_k=9), "max_k"),
        (dict(num_null_experts=-1), "num_null_experts: must be >= 0"),
        (dict(num_null_experts=2, num_groups=2), "num_groups"),
        (dict(num_copy_experts=1, bias_update_rate=1e-3), "bias_update_rate"),
        (dict(num_null_experts=1, router_type="random"), "router_type=learned"),
        (dict(gating_residual=True, router_type="random"), "router_type=learned"),
        (dict(zero_compute_aux_weight=-1.0), "zero_compute_aux_weight"),
    ],
)
def test_bad_combinations_are_one_line(kw, named):
    with pytest.raises(ValueError, match=r"model\.moe\.") as err:
        moe(**kw)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_exports_refuse_research_options():
    from moetrain.checkpoint.hf.registry import get_arch
    from moetrain.checkpoint.megatron_config import export_problems
    from moetrain.models.config import ModelConfig

    assert research_options(moe()) == []
    got = research_options(moe(num_null_experts=1, top_p=0.5))
    assert got == [
        "model.moe.num_null_experts=1 (routing research)",
        "model.moe.top_p=0.5 (routing research)",
    ]
    kw = dict(vocab_size=64, dim=D, num_layers=2, num_heads=2, num_kv_heads=2, first_k_dense=0)
    plain = ModelConfig(**kw, moe=moe())
    assert get_arch("mixtral").fits(plain) == [] and export_problems(plain) == []
    cfg = ModelConfig(**kw, moe=moe(expert_choice="sequence", capacity_factor=1.0))
    named = "model.moe.expert_choice=sequence (routing research)"
    assert named in get_arch("mixtral").fits(cfg) and named in export_problems(cfg)


def test_null_and_zero_computation_experts_keep_the_default_router_bitwise():
    """Without options the router and layer are the ones before them: same ids, same weights
    bit for bit as a fresh top-k of the same scores."""
    layer = build({})
    x = torch.randn(16, D)
    routed = layer.router(x)
    scores = torch.softmax(torch.nn.functional.linear(x, layer.router.weight_ED), -1)
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :2]
    w = scores.gather(-1, top)
    w = w / (w.sum(-1, keepdim=True) + 1e-20)
    assert torch.equal(routed.topk_ids_TK, top) and torch.equal(routed.topk_weights_TK, w)
    assert routed.active_TK is None


# --- what the trainer logs ---------------------------------------------------------------------


def test_step_rows_report_width_ffn_experts_and_route_shares():
    from moetrain.train.metrics import StepStats

    x = torch.randn(2, 12, D)
    layers = [build(dict(num_null_experts=2, num_copy_experts=1, top_k=3), seed=s) for s in (0, 1)]
    want = []
    stats = StepStats()
    for i, layer in enumerate(layers):
        layer(x)
        s = layer.last_stats
        stats.add_layer_stats(i, s)
        want.append(s.route_counts / s.num_tokens)
    # summed over ranks as the trainer does (two identical ranks: the shares are unchanged)
    vec = stats.to_vector(2, 4, 12)
    row = StepStats.from_vector(vec + vec, 2, 4, 12).moe_fields(1)
    for i in range(2):
        assert row["experts_per_token"][i] == pytest.approx(float(want[i].sum()))  # 3 slots
        assert row["ffn_experts_per_token"][i] == pytest.approx(float(want[i][0]))
        shares = [row["route_share"][k][i] for k in ("ffn", "null", "zero", "copy", "constant")]
        assert shares == pytest.approx((want[i] / want[i].sum()).tolist())
    assert row["experts_per_token"][0] == pytest.approx(3.0)
    assert "unrouted_frac" in row
    plain, layer = StepStats(), build({})
    layer(x)
    plain.add_layer_stats(0, layer.last_stats)
    fields = plain.moe_fields(1)  # only FFN experts: no shares, width 2
    assert "route_share" not in fields and fields["experts_per_token"] == [2.0]


def test_active_parameters_count_the_nominal_ffn_experts():
    from moetrain.models.config import ModelConfig
    from moetrain.models.transformer import Transformer

    kw = dict(vocab_size=64, dim=D, num_layers=2, num_heads=2, num_kv_heads=2, first_k_dense=0)

    def routed_active(**moe_kw) -> int:
        """Active parameters of the routed experts alone: the model's, minus everything else."""
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", NonCausalRoutingWarning)
            m = Transformer(ModelConfig(**kw, moe=moe(**moe_kw)))
        routed = sum(p.numel() for layer in m.moe_layers() for p in layer.experts.parameters())
        return m.num_active_params() - (m.num_params() - routed)

    per_expert = 2 * 3 * 24 * D  # one expert in each of 2 MoE layers: w1, w3, w2 of 24 x D
    assert routed_active() == 2 * per_expert  # top-2
    # 4 FFN + 4 extra routes: top_k x 4/8 FFN experts per token when balanced
    assert routed_active(num_null_experts=4, top_k=3) == 1.5 * per_expert
    assert routed_active(num_copy_experts=4, top_k=2) == per_expert
    assert routed_active(expert_choice="sequence", capacity_factor=1.5) == 3 * per_expert
    assert routed_active(top_p=0.5) == 2 * per_expert  # nominal top_k; measured is logged
