"""The compiled kernels' first-use self-check (``moetrain.ops.selfcheck``), on CPU.

A wrong kernel is injected by registering a Python kernel over the compiled one for the CPU key
(``torch.library.Library("moetrain", "IMPL")``): the check compares whatever runs for the key
with the pure-torch reference. Every test starts from a forgotten outcome and leaves none behind
(the ``fresh`` fixture: injected kernels destroyed, fallback removed), so the other op tests in
the same process see the compiled kernels.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moetrain.ops import (
    OPS,
    CsrcSelfCheckWarning,
    active_backend,
    expert_sort,
    extension_error,
    permute,
    reference_kernels,
    self_check,
    selfcheck,
    selfcheck_results,
    unpermute,
)
from moetrain.ops.permute import (
    permute_reference,
    unpermute_backward_reference,
    unpermute_reference,
)
from moetrain.ops.sort import expert_sort_reference

needs_extension = pytest.mark.skipif(
    extension_error() is not None,
    reason=f"csrc extension not loaded ({extension_error()}): no compiled kernel to check",
)


@pytest.fixture
def fresh() -> Iterator[list[torch.library.Library]]:
    """A forgotten outcome; yields a list for injected libraries, destroyed afterwards."""
    selfcheck.reset_for_tests()
    injected: list[torch.library.Library] = []
    try:
        yield injected
    finally:
        for lib in injected:
            lib._destroy()
        selfcheck.reset_for_tests()


def inject(libs: list[torch.library.Library], name: str, kernel: Callable) -> None:
    lib = torch.library.Library("moetrain", "IMPL")
    libs.append(lib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered kernel"
        lib.impl(name, kernel, "CPU")


@contextlib.contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """The self-check warnings raised inside the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out: list[warnings.WarningMessage] = []
        yield out
    out.extend(w for w in caught if issubclass(w.category, CsrcSelfCheckWarning))


ROW_TOKEN = torch.tensor([2, 0, -1, 2, 1, 4])
X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))  # T=5 tokens
ROWS = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))  # R=6 rows
W = torch.rand(6, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([3, 1, 3, 0, 1, 3])


def _shifted_permute(x, row_token):
    return permute_reference(x, row_token).roll(1, 0)


def _scaled_unpermute(rows, row_token, weight, num_tokens):
    return unpermute_reference(rows, row_token, weight, num_tokens) * (1 + 1e-3)


def _off_weight_grad(grad_out, rows, row_token, weight):
    grad_rows, grad_weight = unpermute_backward_reference(grad_out, rows, row_token, weight)
    return grad_rows, grad_weight + 1e-3


def _unstable_sort(ids, num_bins):
    # ties in reverse order: an unstable sort, with the right histogram
    n = len(ids)
    indices = torch.sort(ids * n + (n - 1 - torch.arange(n))).indices
    return indices, torch.bincount(ids, minlength=num_bins)


def _short_permute(x, row_token):
    return permute_reference(x, row_token)[:-1]


def _raising_permute(x, row_token):
    raise RuntimeError("boom\nsecond line")


# op name, wrong kernel, a public call reaching it, what the reference returns for that call
WRONG = {
    "permute": (_shifted_permute, lambda: permute(X, ROW_TOKEN), permute_reference(X, ROW_TOKEN)),
    "unpermute": (
        _scaled_unpermute,
        lambda: unpermute(ROWS, ROW_TOKEN, W, 5),
        unpermute_reference(ROWS, ROW_TOKEN, W, 5),
    ),
    "expert_sort": (_unstable_sort, lambda: expert_sort(IDS, 5), expert_sort_reference(IDS, 5)),
}


@needs_extension
def test_passes_on_the_compiled_kernels(fresh):
    assert selfcheck_results()["CPU"]["status"] == "not_run"
    assert active_backend().endswith("; self-check not run yet)")
    permute(X, ROW_TOKEN)  # the first use runs it
    result = selfcheck_results()["CPU"]
    assert result["status"] == "passed" and result["device"] == "cpu"
    assert sorted(result["ops"]) == sorted(OPS) and result["failed_ops"] == []
    assert all(r["ok"] and r["max_abs_diff"] < 1e-5 for r in result["ops"].values())
    assert 0 < result["ms"] < 5000
    n = torch.get_num_threads()
    assert (
        active_backend() == f"csrc (C++ CPU, OpenMP {n} thread{'s' * (n > 1)}; self-check passed)"
    )
    json.dumps(selfcheck_results(), allow_nan=False)  # what a report tool prints


@needs_extension
@pytest.mark.parametrize("name", WRONG)
def test_wrong_kernel_warns_once_and_falls_back(fresh, name):
    kernel, call, want = WRONG[name]
    inject(fresh, name, kernel)
    with recorded() as first:
        got = call()
    assert len(first) == 1, [str(w.message) for w in first]
    message = str(first[0].message)
    assert message.startswith(f"moetrain: csrc kernel moetrain::{name} on cpu disagrees with")
    assert "MOETRAIN_NO_CSRC=1" in message
    got, want = (got, want) if name == "expert_sort" else ((got,), (want,))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))  # the reference's
    result = selfcheck_results()["CPU"]
    assert result["status"] == "failed" and result["failed_ops"] == [f"moetrain::{name}"]
    assert active_backend().startswith(
        f"pure-torch reference (csrc self-check failed on CPU: moetrain::{name} "
    )
    with recorded() as second:
        call()
    assert second == [] and selfcheck_results()["CPU"] == result  # once per process


@needs_extension
def test_one_bad_kernel_moves_every_op_to_the_reference(fresh):
    calls = []

    def spy_unpermute(*args):  # right, but counts its calls
        calls.append(1)
        return unpermute_reference(*args)

    inject(fresh, "unpermute", spy_unpermute)
    inject(fresh, "permute", _shifted_permute)
    with recorded() as caught:
        permute(X, ROW_TOKEN)
    assert len(caught) == 1 and len(calls) == 2  # the check's two unpermute cases
    assert selfcheck_results()["CPU"]["ops"]["moetrain::unpermute"]["ok"]
    assert torch.equal(unpermute(ROWS, ROW_TOKEN, W, 5), unpermute_reference(ROWS, ROW_TOKEN, W, 5))
    assert len(calls) == 2  # the reference ran, not the (unflagged) kernel on the CPU key


@needs_extension
def test_unpermute_backward_is_checked_and_replaced(fresh):
    inject(fresh, "unpermute_backward", _off_weight_grad)
    rows = ROWS.clone().requires_grad_(True)
    weight = W.clone().requires_grad_(True)
    grad_out = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    # the op itself, past the wrappers: the check runs from unpermute's backward
    y = torch.ops.moetrain.unpermute(rows, ROW_TOKEN, weight, 5)
    assert selfcheck_results()["CPU"]["status"] == "not_run"
    with recorded() as caught:
        y.backward(grad_out)
    assert len(caught) == 1 and "moetrain::unpermute_backward on cpu" in str(caught[0].message)
    want_rows, want_weight = unpermute_backward_reference(grad_out, ROWS, ROW_TOKEN, W)
    assert torch.equal(rows.grad, want_rows) and torch.equal(weight.grad, want_weight)


@needs_extension
@pytest.mark.parametrize(
    ("kernel", "detail"),
    [  # the check's permute problem has 29 rows of dimension 37
        (_short_permute, "output [28, 37] torch.float32, the reference [29, 37] torch.float32"),
        (_raising_permute, "raised RuntimeError: boom"),
    ],
    ids=["wrong_shape", "raises"],
)
def test_incomparable_outputs_are_failures(fresh, kernel, detail):
    inject(fresh, "permute", kernel)
    with recorded() as caught:
        result = self_check("cpu")
    assert result["ops"]["moetrain::permute"] == {
        "ok": False,
        "max_abs_diff": None,
        "detail": detail,
    }
    assert len(caught) == 1 and f"(moetrain::permute {detail})" in str(caught[0].message)
    assert active_backend() == (
        f"pure-torch reference (csrc self-check failed on CPU: moetrain::permute {detail})"
    )


@needs_extension
def test_not_run_while_tracing_or_inside_reference_kernels(fresh):
    with FakeTensorMode() as mode:
        permute(mode.from_tensor(X), mode.from_tensor(ROW_TOKEN))
    # dynamo traces the wrappers without a graph break and without running the check
    compiled = torch.compile(lambda x: permute(x, ROW_TOKEN) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(X), permute_reference(X, ROW_TOKEN) * 2)
    with reference_kernels():  # the kernels there are the references, not the compiled ones
        permute(X, ROW_TOKEN)
    assert selfcheck_results()["CPU"]["status"] == "not_run"
    permute(X, ROW_TOKEN)
    assert selfcheck_results()["CPU"]["status"] == "passed"


@needs_extension
def test_runs_once_across_threads(fresh, monkeypatch):
    runs = []
    run_cases = selfcheck._run_cases

    def slow_run_cases(*args):
        runs.append(threading.get_ident())
        time.sleep(0.05)  # the other threads arrive while it runs
        return run_cases(*args)

    monkeypatch.setattr(selfcheck, "_run_cases", slow_run_cases)
    statuses = []

    def use():
        expert_sort(IDS, 5)
        statuses.append(selfcheck_results()["CPU"]["status"])

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1 and statuses == ["passed"] * 4


@needs_extension
def test_leaves_the_global_rng_alone(fresh):
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    self_check("cpu")
    assert selfcheck_results()["CPU"]["status"] == "passed"
    assert torch.equal(torch.rand(4), want)


def test_self_check_rejects_other_device_types():
    with pytest.raises(ValueError, match="no csrc kernels exist for device type 'meta'"):
        self_check("meta")


def test_not_applicable_without_compiled_kernels():
    # a fresh process: the extension cannot be unloaded from this one
    code = (
        "import torch\n"
        "from moetrain.ops import active_backend, permute, selfcheck_results\n"
        "permute(torch.ones(2, 3), torch.tensor([1, -1]))\n"
        "print(selfcheck_results()['CPU']['status'])\n"
        "print(active_backend())\n"
    )
    env = {**os.environ, "MOETRAIN_NO_CSRC": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "not_applicable",
        "pure-torch reference (extension not built: disabled by MOETRAIN_NO_CSRC=1)",
    ]
