"""DDP over seeds on CPU (gloo): every item ends exactly where a one-process run leaves it."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pipeline_dir, write_config):
    tmp = tmp_path_factory.mktemp("ddp")
    pipe = tiny_pipeline_dir
    # micro_batch 1: every item is evaluated alone in both runs, so CPU kernels see identical shapes;
    # one thread: Lightning gives each of 2 DDP processes cores // 2 threads, and the reduction order
    # of CPU kernels depends on the thread count (2 vs 1 threads differ by ~1e-7, float32 rounding)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = main(["fit", "--config", write_config(tmp / "one.yaml", pipe, tmp / "one", steps=2, micro_batch=1, seeds=[0, 1, 2])])
    torch.set_num_threads(threads)
    ref = {it.index: one.model.latents.detach()[j] for j, it in enumerate(one.model.local_items)}
    return tmp, pipe, ref


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latents_from_checkpoints(run_dir: Path) -> dict[int, torch.Tensor]:
    out = {}
    for ckpt in sorted((run_dir / "checkpoints").glob("last.ckpt*")):
        c = torch.load(ckpt, weights_only=True)
        for j, item in enumerate(c["doodl_items"]):
            out[item["index"]] = c["state_dict"]["latents"][j]
    return out


def check_run(run_dir: Path, ref: dict[int, torch.Tensor]) -> None:
    got = latents_from_checkpoints(run_dir)
    assert sorted(got) == sorted(ref) == list(range(6))
    for i in ref:
        assert torch.equal(got[i], ref[i]), f"item {i} differs from the one-process run"
    records = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    # item i runs on rank i % world_size (items[rank::world_size]), not in contiguous blocks
    assert [r["rank"] for r in records] == [r["index"] % 2 for r in records] == [0, 1, 0, 1, 0, 1]
    assert (run_dir / "contact_sheet.png").is_file()


def test_shard_deals_items_round_robin():
    from doodl_lightning.data import Item, shard

    items = [Item(i, f"p{i // 3}", i % 3) for i in range(7)]
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert [[it.index for it in part] for part in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    assert all(it.index % 3 == rank for rank, part in enumerate(parts) for it in part)
    assert [it.index for it in shard(items, 0, 1)] == list(range(7))


def test_a_second_node_uses_its_global_rank(tiny_pipeline_dir, monkeypatch):
    """The default-suite twin of the slow torchrun test's difference from the one-node test below: on node 1 of 2
    (one process each) the local rank is 0 and the global rank 1, so the items and the checkpoint's file name must
    come from the global rank (the local one would make both nodes optimise and save rank 0's items)."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment

    from doodl_lightning.data import shard
    from doodl_lightning.guidance import SymmetryGuidance
    from doodl_lightning.module import DOODL
    from doodl_lightning.strategy import SeedParallelStrategy

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setenv("LOCAL_RANK", "0")
    # set_global_rank also sets the process-wide rank_zero_only.rank: restored after the test, or every later fit in
    # this process would think it is rank 1 and skip its rank-zero logging (no TensorBoard scalars at all)
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))
    env = LightningEnvironment()
    env.set_world_size(2)
    env.set_global_rank(1)
    strategy = SeedParallelStrategy(cluster_environment=env)
    assert (strategy.local_rank, strategy.global_rank) == (0, 1)
    assert strategy._rank_path("last.ckpt") == "last.ckpt.rank1"
    m = DOODL(model=tiny_pipeline_dir, prompts=["a red circle"], seeds=[0, 1, 2], steps=2,
              guidance=[SymmetryGuidance()])
    m._trainer = SimpleNamespace(world_size=2, global_rank=1, local_rank=0, node_rank=1, precision="32-true")
    m.setup("fit")
    assert m.local_items == shard(m.items, 1, 2) and [it.index for it in m.local_items] == [1]


def test_two_processes_equal_one_process(setup, write_config):
    tmp, pipe, ref = setup
    cfg = write_config(tmp / "two.yaml", pipe, tmp / "two", steps=2, micro_batch=1, seeds=[0, 1, 2])
    r = subprocess.run([sys.executable, "cli.py", "fit", "--config", cfg, "--trainer.devices", "2",
                        "--trainer.strategy", "seed_parallel"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    check_run(tmp / "two/lightning_logs/version_0", ref)


@pytest.mark.slow  # fast twin: test_a_second_node_uses_its_global_rank
def test_two_nodes_through_torchrun_environment(setup, write_config):
    """Two single-process 'nodes' on 127.0.0.1, launched by torchrun as on a cluster."""
    tmp, pipe, ref = setup
    cfg = write_config(tmp / "nodes.yaml", pipe, tmp / "nodes", steps=2, micro_batch=1, seeds=[0, 1, 2])
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
               "cli.py", "fit", "--config", cfg, "--trainer.num_nodes", "2", "--trainer.devices", "1",
               "--trainer.strategy", "seed_parallel"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    check_run(tmp / "nodes/lightning_logs/version_0", ref)
