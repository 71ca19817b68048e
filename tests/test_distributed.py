"""``torchrun``-style training: 2 CPU processes (gloo) each on a contiguous shard equal one
process on both shards' batches side by side; rank 0 alone writes checkpoints with world_size."""
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from g2quant.checkpoint import load_checkpoint
from g2quant.models import LMConfig, WordLM
from g2quant.train import TrainConfig, train_lm

CFG = LMConfig(vocab_size=30, emb_size=12, hidden_size=12, num_layers=2, gates="sigmoid")


def _data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 30, 8 * 64).astype(np.int64), rng.integers(0, 30, 200).astype(np.int64)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = WordLM(CFG)
    train, valid = _data()
    train_lm(model, train, valid, TrainConfig(epochs=1, batch_size=4, bptt=8, max_batches=3, lr=5.0), out,
             progress=False, log=lambda s: None)
    import torch.distributed as dist
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.manual_seed(0)
    model = WordLM(CFG)
    train, valid = _data()
    train_lm(model, train, valid, TrainConfig(epochs=1, batch_size=8, bptt=8, max_batches=3, lr=5.0),
             tmp_path / "single", progress=False, log=lambda s: None)
    a, rec = load_checkpoint(tmp_path / "ddp" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "single" / "last.safetensors")
    assert rec["world_size"] == 2 and json.loads((tmp_path / "ddp" / "history.json").read_text())[0]["world_size"] == 2
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ddp").iterdir())
