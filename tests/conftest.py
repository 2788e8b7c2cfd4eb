import pytest
import torch
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same RNG state, so a failure reproduces on rerun."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run wherever CUDA exists and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo default group for the test (skipped if one already exists)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
