"""NVIDIA apex where it exists: ``optim.implementation=apex`` (FusedAdam as AdamW) and
``model.norm_impl=apex`` (fused RMSNorm).

On a CPU: the one-line errors (apex missing, the unrelated PyPI ``apex``, an apex without its
CUDA extensions, unsupported combinations), and the FusedAdam subclass's torch-AdamW state and
checkpoints, over a stand-in with apex's interface. With CUDA and apex (``gpu``): FusedAdam
against torch's AdamW and the fused norm against the torch ops, forward and backward.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types

import pytest
import torch

from moetrain import apex
from moetrain.checkpoint import native
from moetrain.config.schema import Config, OptimConfig
from moetrain.config.validate import ConfigError, validate
from moetrain.models import ModelConfig, Transformer, norms
from moetrain.models.norms import RMSNorm, set_norm_impl
from moetrain.moe import MoEConfig
from moetrain.train.optim import apex_adamw, build_optimizer, fused_adamw, parameter_groups

NO_APEX = apex.problem(apex.OPTIMIZERS) or apex.problem(apex.NORMALIZATION)


def tiny_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, dim=32, hidden_dim=16)
    return ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=2, num_kv_heads=1, dense_hidden_dim=32,
        max_seq_len=16, first_k_dense=1, qk_norm="head", moe=moe, **kw,
    )  # fmt: skip


def config(**sections) -> Config:
    cfg = Config()
    cfg.logging.wandb.mode = "disabled"
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.fixture
def no_apex(monkeypatch):
    """apex as where it is not installed, even where it is."""
    real = apex.importlib.import_module

    def import_module(name: str):
        if name == "apex" or name.startswith("apex."):
            raise ModuleNotFoundError("No module named 'apex'", name="apex")
        return real(name)

    monkeypatch.setattr(apex.importlib, "import_module", import_module)
    norms._apex_fused_layer_norm.cache_clear()
    yield
    norms._apex_fused_layer_norm.cache_clear()


@pytest.fixture
def forget_apex(monkeypatch):
    """No apex module imported so far (a real one, where installed) is seen by the test."""
    for name in [n for n in sys.modules if n == "apex" or n.startswith("apex.")]:
        monkeypatch.delitem(sys.modules, name)
    norms._apex_fused_layer_norm.cache_clear()
    yield
    norms._apex_fused_layer_norm.cache_clear()


def fake_module(monkeypatch, name: str, package: bool = False, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = f"/site-packages/{name.replace('.', '/')}/__init__.py"
    if package:
        module.__path__ = []
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


# --- the one-line errors ----------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("setting", "fallback"),
    [
        ("optim__implementation", "optim.implementation=fused"),
        ("model__norm_impl", "model.norm_impl=torch"),
    ],
)
def test_missing_apex_stops_validation_with_one_line(no_apex, setting, fallback):
    with pytest.raises(ConfigError) as err:
        validate(config(**{setting: "apex"}))
    message = one_line(err)
    assert message.startswith(f"{setting.replace('__', '.')}: apex needs NVIDIA apex, but it is")
    assert "not installed" in message and "NGC PyTorch images" in message
    assert "do not `pip install apex`" in message and message.endswith(f"use {fallback} instead")


def test_the_unrelated_pypi_apex_is_named(forget_apex, monkeypatch):
    fake_module(monkeypatch, "apex")  # a module, not NVIDIA's package: no apex.optimizers
    for part in (apex.OPTIMIZERS, apex.NORMALIZATION):
        why = apex.problem(part)
        assert why is not None and "unrelated PyPI package" in why, why
        assert "pip uninstall apex" in why and "/site-packages/apex/__init__.py" in why


def test_an_apex_without_its_cuda_extension_is_named(forget_apex, monkeypatch):
    fake_module(monkeypatch, "apex", package=True)
    fake_module(monkeypatch, "apex.optimizers", FusedAdam=object)
    monkeypatch.setitem(sys.modules, "amp_C", None)
    with pytest.raises(ConfigError) as err:
        validate(config(optim__implementation="apex"))
    assert "built without its CUDA extension amp_C" in one_line(err)


def test_an_apex_that_fails_to_import_is_reported_not_raised(monkeypatch):
    def broken(name: str):
        raise SyntaxError("Missing parentheses in call to 'print'")

    monkeypatch.setattr(apex.importlib, "import_module", broken)
    why = apex.problem(apex.OPTIMIZERS)
    assert why is not None and why.startswith("import apex.optimizers failed (SyntaxError")


def test_apex_with_sgd_is_an_error_not_a_warning():
    with pytest.raises(ConfigError, match=r"^optim\.implementation: apex is apex's FusedAdam"):
        validate(config(optim__implementation="apex", optim__name="sgd"))


def test_fused_norm_with_tensor_parallel_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^model\.norm_impl: .*parallel\.tp > 1"):
        validate(config(model__norm_impl="apex", parallel__tp=2))


def test_norm_impl_choice_is_checked():
    with pytest.raises(ValueError, match=r"^model\.norm_impl: must be one of torch, apex"):
        tiny_cfg(norm_impl="fused")
    with pytest.raises(ValueError, match=r"^model\.norm_impl: must be one of"):
        set_norm_impl(Transformer(tiny_cfg()), "fused")


def test_fused_norm_without_apex_names_the_setting(no_apex):
    with pytest.raises(ValueError, match=r"^model\.norm_impl: apex needs NVIDIA apex, but it is"):
        norms._apex_fused_layer_norm()


def test_fused_norm_with_an_apex_that_predates_it_names_the_setting(forget_apex, monkeypatch):
    fake_module(monkeypatch, "apex", package=True)
    fake_module(monkeypatch, "apex.normalization", package=True)
    fake_module(monkeypatch, "apex.normalization.fused_layer_norm")  # no RMSNorm functions
    fake_module(monkeypatch, "fused_layer_norm_cuda")
    with pytest.raises(ValueError, match=r"predates its fused RMSNorm \(fused_rms_norm_affine\)"):
        norms._apex_fused_layer_norm()


def test_build_optimizer_refuses_sgd_and_cpu_parameters():
    model = Transformer(tiny_cfg())
    with pytest.raises(ValueError, match=r"^optim\.implementation: apex is .*, not sgd"):
        build_optimizer(model, OptimConfig(implementation="apex", name="sgd"))
    with pytest.raises(ValueError, match=r"^optim\.implementation: .*parameters are on cpu"):
        build_optimizer(model, OptimConfig(implementation="apex"))


@pytest.mark.timeout(120)
def test_build_optimizer_refuses_dtensor_parameters(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Replicate()]))
        groups = [{"params": [weight], "lr": 1e-3, "weight_decay": 0.0}]
        with pytest.raises(ValueError, match=r"shards the parameters as DTensors.*=fused"):
            apex_adamw(groups, OptimConfig(implementation="apex"))
    finally:
        dist.destroy_process_group()


# --- the fused norm's wiring -----------------------------------------------------------------


def test_set_norm_impl_reaches_every_rmsnorm_and_cpu_inputs_take_the_torch_ops():
    model = Transformer(tiny_cfg())
    fused = copy.deepcopy(model)
    set_norm_impl(fused, "apex")
    rms = [m for m in fused.modules() if isinstance(m, RMSNorm)]
    assert len(rms) == 2 * 2 + 1 + 2 * 2 and {m.impl for m in rms} == {"apex"}  # + q/k norms
    assert list(fused.state_dict()) == list(model.state_dict())  # checkpoints, HF export
    tokens = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(fused(tokens), model(tokens), rtol=0, atol=0)


def test_model_norm_impl_reaches_the_built_model():
    model = Transformer(tiny_cfg(norm_impl="apex"))
    assert {m.impl for m in model.modules() if isinstance(m, RMSNorm)} == {"apex"}


# --- FusedAdam's subclass: torch's AdamW state, over a stand-in with apex's interface -----------


class ApexLikeFusedAdam(torch.optim.Optimizer):
    """apex's ``FusedAdam`` as seen from outside: its constructor, a step count per param group,
    ``exp_avg``/``exp_avg_sq`` state and an argument-less ``zero_grad``; the AdamW update done
    with torch ops (apex's kernel is CUDA-only)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0, amsgrad=False):  # fmt: skip
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                        weight_decay=weight_decay)  # fmt: skip
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode

    def zero_grad(self):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (b1, b2), t, lr = group["betas"], group["step"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                assert self.adam_w_mode
                p.mul_(1 - lr * group["weight_decay"])
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], expert_lr_multiplier=0.5)


def train(model: Transformer, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for _ in range(steps):
        tokens = torch.randint(0, 64, (2, 8), generator=gen).to(device)
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def torch_adamw(model: Transformer) -> torch.optim.Optimizer:
    return build_optimizer(model, OPTIM)


def apex_like(model: Transformer) -> torch.optim.Optimizer:
    return fused_adamw(ApexLikeFusedAdam, parameter_groups(model, OPTIM), OPTIM)


def assert_same_params(a: Transformer, b: Transformer) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_adamw_takes_the_groups_lr_multiplier_weight_decay_betas_and_eps():
    model = Transformer(tiny_cfg())
    twin = copy.deepcopy(model)
    opt = apex_like(model)
    assert isinstance(opt, ApexLikeFusedAdam)
    assert [g["name"] for g in opt.param_groups] == [
        g["name"] for g in parameter_groups(twin, OPTIM)
    ]
    train(model, opt, 4)
    train(twin, torch_adamw(twin), 4)
    assert_same_params(model, twin)
    assert all(
        s["step"].dtype == torch.float32 and float(s["step"]) == 4 for s in opt.state.values()
    )


@pytest.mark.parametrize(("first", "second"), [("apex", "torch"), ("torch", "apex")])
def test_checkpoints_move_between_torch_adamw_and_fused_adam(tmp_path, first, second):
    """Saved with one implementation as a native checkpoint (per-parameter state only: param
    groups come from the config), resumed with the other: it goes on as an uninterrupted torch
    AdamW run would."""
    make = {"apex": apex_like, "torch": torch_adamw}
    model = Transformer(tiny_cfg())
    reference = copy.deepcopy(model)
    reference_opt = torch_adamw(reference)
    train(reference, reference_opt, 3)
    train(reference, reference_opt, 2, seed=2)
    opt = make[first](model)
    train(model, opt, 3)
    path = native.save(tmp_path, 3, model, opt, {}, keep_last=0)
    resumed = Transformer(tiny_cfg())
    resumed_opt = make[second](resumed)
    native.load(path, resumed, resumed_opt, same_layout=True)
    if second == "apex":  # the bias correction goes on from step 3, not from 1
        assert {g["step"] for g in resumed_opt.param_groups} == {3}
    train(resumed, resumed_opt, 2, seed=2)
    assert_same_params(resumed, reference)


# --- with CUDA and NVIDIA apex ------------------------------------------------------------------

needs_apex = pytest.mark.skipif(NO_APEX is not None, reason=f"NVIDIA apex: {NO_APEX}")


@pytest.mark.gpu
@needs_apex
def test_fused_adam_matches_torch_adamw_and_hands_its_state_over():
    model = Transformer(tiny_cfg()).cuda()
    twin = copy.deepcopy(model)
    opt = build_optimizer(model, dataclasses.replace(OPTIM, implementation="apex"))
    reference = build_optimizer(twin, OPTIM)
    train(model, opt, 4)
    train(twin, reference, 4)
    assert_same_params(model, twin)
    handed = torch_adamw(model)  # a resume with torch's AdamW from apex's state
    handed.load_state_dict(opt.state_dict())
    train(model, handed, 2, seed=2)
    train(twin, reference, 2, seed=2)
    assert_same_params(model, twin)


TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 3e-2, "atol": 5e-2},
}


@pytest.mark.gpu
@needs_apex
@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),  # bf16 activations, fp32 weights: the mixed kernel
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_rmsnorm_matches_the_torch_ops(x_dtype, w_dtype, autocast):
    ours = RMSNorm(64).cuda().to(w_dtype)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.2)
    fused = copy.deepcopy(ours)
    set_norm_impl(fused, "apex")
    x = (3 * torch.randn(4, 16, 64, device="cuda")).to(x_dtype)
    x_ours, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y_ours, y_fused = ours(x_ours), fused(x_fused)
    assert y_fused.dtype == y_ours.dtype == torch.promote_types(x_dtype, w_dtype)
    tol = TOLERANCE[torch.bfloat16 if torch.bfloat16 in (x_dtype, w_dtype) else torch.float32]
    torch.testing.assert_close(y_fused, y_ours, **tol)
    grad = torch.randn_like(y_ours)
    y_ours.backward(grad)
    y_fused.backward(grad)
    torch.testing.assert_close(x_fused.grad, x_ours.grad, **tol)
    # the weight gradient sums 64 rows: its rounding grows with the sum
    torch.testing.assert_close(fused.weight.grad, ours.weight.grad, rtol=tol["rtol"], atol=1.0)


@pytest.mark.gpu
@needs_apex
def test_model_with_fused_norms_matches_and_keeps_its_parameter_names():
    model = Transformer(tiny_cfg()).cuda()
    fused = copy.deepcopy(model)
    set_norm_impl(fused, "apex")
    assert list(fused.state_dict()) == list(model.state_dict())
    tokens = torch.randint(0, 64, (2, 8), device="cuda")
    torch.testing.assert_close(fused(tokens), model(tokens), rtol=1e-5, atol=1e-5)
