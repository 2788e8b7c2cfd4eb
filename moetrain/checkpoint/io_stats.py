"""How many checkpoint bytes this process has read: what a sharded load is checked against
(each rank should read about its own share, not the whole checkpoint).

    before = bytes_read()
    load_weights(path, module, cfg)
    print(bytes_read() - before)

Counted: the tensor data each Hugging Face safetensors read copies out of a file (the region
asked for, not the whole tensor) plus the header of every safetensors file opened; for native
checkpoints, the byte range of every stored chunk ``torch.distributed.checkpoint`` reads (it
reads whole chunks: a chunk saved at another layout is read whole when this rank needs any of
it) plus the ``.metadata`` file on the ranks that read it. Not counted: ``config.json``,
``train_state.json``, RNG files and checksum hashing (which reads files it does not load).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_total = 0


def bytes_read() -> int:
    """Checkpoint bytes this process has read since it started (see the module docstring for
    what counts); never decreases: take the difference around a load."""
    return _total


def add_bytes_read(n: int) -> None:
    """Record ``n`` more bytes read (the checkpoint readers call this)."""
    global _total
    with _lock:  # DCP may read from more than one thread
        _total += int(n)
