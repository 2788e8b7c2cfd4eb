"""Document masking (``data.document_mask``): a packed window's logits are each document's
logits run alone; the ids, positions and mask on hand-written rows; the flex-attention path
against the SDPA path (forward on CPU, forward and backward on CUDA)."""

import pytest
import torch

import moetrain.models.transformer as transformer_module
from moetrain.models import ModelConfig, Transformer
from moetrain.models.attention import Attention, MLAttention
from moetrain.models.documents import (
    document_ids,
    document_inputs,
    document_mask,
    document_positions,
    flex_block_mask,
)
from moetrain.models.rope import RotaryEmbedding, apply_rope
from moetrain.moe.config import MoEConfig

EOS = 63
V = 64
BASE = dict(vocab_size=V, num_layers=3, num_heads=4, num_kv_heads=2, dense_hidden_dim=48)
MLA = dict(
    attention="mla", num_kv_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=6,
    v_head_dim=12, q_lora_rank=12,
)  # fmt: skip
MODELS = {
    "gqa": {},
    "sliding_window": dict(sliding_window=3),
    "mla": MLA,
    "mla_window": dict(MLA, sliding_window=4),
    "qk_norm_head": dict(qk_norm="head"),
    "qk_norm_full": dict(qk_norm="full"),
}


def make_model(dim: int = 32, **kw) -> Transformer:
    cfg = ModelConfig(
        **{**BASE, "dim": dim, **kw}, init_std=0.2, moe=MoEConfig(dim=dim, hidden_dim=24)
    )
    return Transformer(cfg).eval()


def documents(lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Random documents of ``lengths`` tokens, the last token of each ``EOS`` (the last one of
    the list is cut short: no ``EOS``, as a window's final document)."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, EOS, (n,), generator=g) for n in lengths]
    for doc in docs[:-1]:
        doc[-1] = EOS
    return docs


# two rows of 16 tokens: [doc1+eos, doc2+eos, partial doc3], and another packing
ROWS = [documents([5, 7, 4], seed=1), documents([1, 9, 2, 4], seed=2)]


def packed() -> torch.Tensor:
    return torch.stack([torch.cat(row) for row in ROWS])


# --- ids, positions, mask on hand-written rows ------------------------------------------------

E = EOS
TOKENS = torch.tensor([[5, E, 7, 8, E, 9], [E, E, 1, 2, 3, E]])


def test_document_ids_and_positions_by_hand():
    ids = document_ids(TOKENS, EOS)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    assert ids.dtype == torch.int64
    pos = document_positions(ids)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]
    assert pos.dtype == torch.int64
    no_eos = torch.tensor([[1, 2, 3]])
    assert document_ids(no_eos, EOS).tolist() == [[0, 0, 0]]
    assert document_positions(document_ids(no_eos, EOS)).tolist() == [[0, 1, 2]]


def test_document_mask_by_hand():
    ids = document_ids(TOKENS, EOS)
    mask = document_mask(ids)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    row0 = [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask[0, 0].int().tolist() == row0
    windowed = document_mask(ids, sliding_window=2)[1, 0]
    doc = [0, 1, 2, 2, 2, 2]
    want = [[int(j <= i and i - j < 2 and doc[i] == doc[j]) for j in range(6)] for i in range(6)]
    assert windowed.int().tolist() == want


def test_document_inputs():
    kw = document_inputs(TOKENS, EOS, "restart")
    assert set(kw) == {"documents_BS", "positions_BS"}
    assert kw["positions_BS"].tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]
    assert set(document_inputs(TOKENS, EOS, "continue")) == {"documents_BS"}
    with pytest.raises(ValueError, match=r"data\.document_positions: must be one of"):
        document_inputs(TOKENS, EOS, "reset")


def test_rope_per_row_positions_equal_each_row_alone():
    cfg = ModelConfig(**BASE, dim=32, moe=MoEConfig(dim=32, hidden_dim=24))
    rope = RotaryEmbedding(cfg)
    pos_BS = document_positions(document_ids(TOKENS, EOS))
    cos_BSd, sin_BSd = rope(pos_BS)
    assert cos_BSd.shape == (2, 6, cfg.head_size)
    x_BSHd = torch.randn(2, 6, 4, cfg.head_size)
    y = apply_rope(x_BSHd, cos_BSd, sin_BSd)
    for b in range(2):
        cos_Sd, sin_Sd = rope(pos_BS[b])
        assert torch.equal(cos_BSd[b], cos_Sd)
        assert torch.equal(y[b : b + 1], apply_rope(x_BSHd[b : b + 1], cos_Sd, sin_Sd))


# --- the model: packed = alone ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_window_logits_equal_each_document_alone(name):
    model = make_model(**MODELS[name])
    tokens = packed()
    with torch.no_grad():
        masked = model(tokens, **document_inputs(tokens, EOS, "restart"))
        plain = model(tokens)
        worst = 0.0
        for b, row in enumerate(ROWS):
            start = 0
            for doc in row:
                alone = model(doc[None])[0]
                got = masked[b, start : start + len(doc)]
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
                worst = max(worst, float((got - alone).abs().max()))
                start += len(doc)
    print(f"{name}: max |packed - alone| = {worst:.2e}")
    # without the mask, later documents see earlier ones (so the test above can fail)
    assert not torch.allclose(plain[0, 5:12], masked[0, 5:12], atol=1e-3)


def test_continue_positions_are_window_positions():
    """``continue`` keeps positions 0..S-1: the rotations differ from ``restart``'s (RoPE is
    relative, so inside a document the logits agree up to rounding), while per-row positions
    do reach the model (without the mask, restarted positions change the logits)."""
    model = make_model()
    tokens = packed()
    restart = document_inputs(tokens, EOS, "restart")
    cont = document_inputs(tokens, EOS, "continue")
    with torch.no_grad():
        a = model(tokens, **restart)
        b = model(tokens, **cont)
        shifted = model(tokens, positions_BS=restart["positions_BS"])
        plain = model(tokens)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(shifted[0, :5], plain[0, :5], atol=1e-5, rtol=0)  # doc1: 0..4
    assert not torch.allclose(shifted[0, 5:], plain[0, 5:], atol=1e-3)


def test_masking_off_is_todays_forward_bit_for_bit():
    """No documents: the forward is the plain causal one (``is_causal`` SDPA), bit for bit as
    the layers called the way the model called them before document masking; a window
    without eos under the mask is the same up to rounding (boolean mask vs ``is_causal``)."""
    model = make_model(sliding_window=None)
    tokens = torch.randint(0, EOS, (2, 16))
    with torch.no_grad():
        cos, sin = model.rope(torch.arange(16))
        h = model.tok_embeddings(tokens)
        for layer in model.layers:
            h = layer(h, cos, sin, tokens)
        before = model.output(model.norm(h)).float()
        assert torch.equal(model(tokens), before)
        assert torch.equal(model(tokens, documents_BS=None, positions_BS=None), before)
        masked = model(tokens, **document_inputs(tokens, EOS, "restart"))
    torch.testing.assert_close(masked, before, atol=1e-5, rtol=0)


def test_wrong_shapes_name_the_setting():
    model = make_model()
    with pytest.raises(ValueError, match=r"documents_BS has shape .* data\.document_mask"):
        model(packed(), documents_BS=torch.zeros(2, 15, dtype=torch.long))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_flow_and_stay_inside_documents(checkpointing):
    """Training mode (activation checkpointing too): every parameter gets a finite gradient,
    and doc2's loss sends no gradient to doc1's embeddings. A dense model: an MoE layer's aux
    loss balances load over the whole micro-batch, so its gradient reaches every token."""
    model = make_model(first_k_dense=3).train()
    for layer in model.layers:
        layer.activation_checkpointing = checkpointing
    tokens = packed()
    captured = {}

    def keep(_module, _inputs, out):
        out.retain_grad()
        captured["h"] = out

    model.tok_embeddings.register_forward_hook(keep)
    logits = model(tokens, **document_inputs(tokens, EOS, "restart"))
    logits[0, 5:12].logsumexp(-1).sum().backward()  # row 0's doc2 only
    grad = captured["h"].grad
    assert torch.equal(grad[0, :5], torch.zeros_like(grad[0, :5]))  # doc1: nothing
    assert torch.equal(grad[0, 12:], torch.zeros_like(grad[0, 12:]))  # doc3: later, nothing
    assert grad[0, 5:12].abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_take_the_mask(checkpointing):
    """``train.compile``: compiled blocks (``aot_eager``: the capture, fast) give the eager
    masked forward and gradients."""
    import copy

    from moetrain.parallel.compile import apply_compile

    eager = make_model(first_k_dense=3).train()
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        for block in model.layers:
            block.activation_checkpointing = checkpointing
    torch._dynamo.reset()
    unspec = torch._dynamo.config.allow_unspec_int_on_nn_module
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=unspec):
        apply_compile(compiled.layers, backend="aot_eager")
        tokens = packed()
        for model in (eager, compiled):
            model(tokens, **document_inputs(tokens, EOS, "restart")).logsumexp(-1).mean().backward()
    torch._dynamo.reset()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


# --- flex attention against the SDPA path -----------------------------------------------------


FLEX_UNFUSED = "ignore:flex_attention called without torch.compile"  # expected on CPU


@pytest.mark.filterwarnings(FLEX_UNFUSED)
@pytest.mark.parametrize("name", ["gqa", "sliding_window", "mla_window"])
def test_flex_forward_equals_sdpa_on_cpu(name, monkeypatch):
    """The flex BlockMask path (CUDA's; its forward also runs, unfused, on CPU) gives the
    SDPA boolean-mask logits."""
    model = make_model(**MODELS[name])
    tokens = packed()
    kw = document_inputs(tokens, EOS, "restart")
    with torch.no_grad():
        sdpa = model(tokens, **kw)
        monkeypatch.setattr(transformer_module, "attention_mask", flex_block_mask)
        flex = model(tokens, **kw)
    print(f"{name}: max |flex - sdpa| on CPU = {(flex - sdpa).abs().max():.2e}")
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings(FLEX_UNFUSED)
def test_flex_attention_module_equals_sdpa_on_cpu():
    """One attention layer of each kind, straight from the module (no model around it)."""
    for kw in ({}, MLA):
        model = make_model(**kw)
        attn = model.layers[0].attention
        assert isinstance(attn, Attention | MLAttention)
        ids = document_ids(packed(), EOS)
        cos, sin = model.rope(document_positions(ids))
        x = torch.randn(2, 16, 32)
        with torch.no_grad():
            a = attn(x, cos, sin, mask=document_mask(ids, model.cfg.sliding_window))
            b = attn(x, cos, sin, mask=flex_block_mask(ids, model.cfg.sliding_window))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _cuda_vs_cpu(name: str):
    """Logits and gradients of the masked packed window: CUDA (flex) against CPU (SDPA), fp32.
    Head dims of 16 (flex's kernels need at least 16); a dense model, so that no near-tie in
    routing can pick other experts on the two devices."""
    kw = dict(MODELS[name], first_k_dense=3)
    if "attention" in kw:
        kw.update(qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    torch.manual_seed(0)
    cpu = make_model(dim=64, **kw).train()
    torch.manual_seed(0)
    gpu = make_model(dim=64, **kw).train().cuda()
    tokens = packed()
    out = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        x = tokens.to(dev)
        logits = model(x, **document_inputs(x, EOS, "restart"))
        logits.float().logsumexp(-1).mean().backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        out.append((logits.detach().cpu(), grads))
    return out


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["gqa", "sliding_window", "mla"])
def test_cuda_flex_path_equals_cpu_sdpa_path(name):
    from torch.nn.attention.flex_attention import BlockMask

    from moetrain.models.documents import attention_mask

    ids = document_ids(packed().cuda(), EOS)
    assert isinstance(attention_mask(ids, None), BlockMask)  # CUDA takes flex
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = _cuda_vs_cpu(name)
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=1e-4, rtol=1e-4)
    assert set(gpu_grads) == set(cpu_grads)
    for n, g in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[n], g, atol=1e-4, rtol=1e-3, msg=n)
