"""Train a small network with SHADE under DistributedDataParallel on the CPU, every layer's state
synchronised across ranks (sync=True, as SyncBatchNorm).

    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 100

Each rank trains on its own shard of scikit-learn's digits; after every step all ranks hold the
same SHADE state, which is what this script checks and prints at the end.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import shade_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--beta", type=float, default=1e-3)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    t = torch.tensor(digits.target)
    x, t = x[rank::world], t[rank::world]  # this rank's shard

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    shade_ops.convert(model, sync=True)
    model(x[:2])  # the ShadeReLUs take their sizes from a first input, before DDP wraps
    shade_ops.collect(model)  # that forward's penalties, read and dropped (else the next warns)
    for m in model.modules():
        if isinstance(m, shade_ops.ShadeState):
            m.reset_state()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)

    generator = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        batch = torch.randint(0, len(x), (args.batch,), generator=generator)
        logits = ddp(x[batch])
        loss = nn.functional.cross_entropy(logits, t[batch]) + args.beta * shade_ops.collect(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    states = torch.cat([m.mu.flatten() for m in model.modules()
                        if isinstance(m, shade_ops.ShadeState)])
    gathered = [torch.empty_like(states) for _ in range(world)]
    dist.all_gather(gathered, states)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == t).float().mean().item()
    print(f"rank {rank}: loss {loss.item():.4f}, shard accuracy {accuracy:.3f}, "
          f"SHADE states identical on all ranks: {same}", flush=True)
    # every rank done with gloo before any tears it down: without it, a rank destroying the group
    # while the other still talks aborted now and then ('terminate called without an active
    # exception', SIGABRT), with or without SHADE
    dist.barrier()
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
