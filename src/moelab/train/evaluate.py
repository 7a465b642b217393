"""The validation loss the trainer logs, over a fixed spread of held-out sequences, in
one process or split over a multi-process run's ranks."""

from __future__ import annotations

import numpy as np
import torch

from ..model import Transformer
from ..parallel.parallelize import all_reduce_floats


def unpack_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets, padding mask or None): packed text has no padding, SFT rows do."""
    return batch[0], batch[1], batch[2] if len(batch) > 2 else None


def eval_batches(data_val, batch_size: int, n_batches: int, shards: int = 1, shard: int = 0):
    """Yield (batch, counted) over a fixed subset of batch_size x n_batches validation
    sequences spread evenly over the whole split (a prefix would be the first few held-out
    documents only, and rank runs by how they do on those), each batch's rows split over
    `shards` ranks. Every rank gets the same number of batches - expert parallelism and
    pipeline stages exchange tensors in each forward - so a rank with no share of one gets
    a dummy row and `counted` False."""
    n = min(len(data_val), batch_size * n_batches)
    chosen = np.unique(np.linspace(0, len(data_val) - 1, n).round().astype(np.int64))
    for start in range(0, len(chosen), batch_size):
        idx = np.array_split(chosen[start : start + batch_size], shards)[shard]
        yield data_val.batch((idx if len(idx) else chosen[:1]).tolist()), len(idx) > 0


@torch.no_grad()
def evaluate(model: Transformer, data_val, batch_size: int, n_batches: int, device, ctx, par=None) -> float:
    """Mean next-token loss (nats) over `eval_batches`' held-out sequences. With `par` (a
    multi-process run) the ranks split each batch and add up their sums."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    shards, shard = (par.world, par.rank) if par is not None else (1, 0)
    for batch, counted in eval_batches(data_val, batch_size, n_batches, shards, shard):
        x, y, mask = unpack_batch(batch)
        with ctx:
            out = model(x.to(device), y.to(device), mask.to(device) if mask is not None else None)
        n_targets = int((y != -100).sum()) if counted else 0
        total += float(out.lm_loss) * n_targets
        count += n_targets
    if par is not None:
        total, count_f = all_reduce_floats([total, float(count)], par, op="sum")
        count = int(count_f)
    model.train(was)
    return total / max(count, 1)


@torch.no_grad()
def evaluate_pipeline(run, ctx) -> float:
    """`evaluate`'s number under parallel.pipeline: the same held-out sequences, each batch
    sent through the stages in order; the same on every rank."""
    from ..parallel.pipeline import pipeline_loss_sum

    tc, data_val = run.cfg.train, run.data.val
    was = run.model.training
    run.model.eval()
    layout = run.par.layout
    total, count = 0.0, 0
    for batch, counted in eval_batches(data_val, tc.batch_size, tc.eval_batches, layout.data, layout.dp_rank):
        x, y, mask = unpack_batch(batch)
        with ctx:
            s, c = pipeline_loss_sum(
                run.model,
                x.to(run.device),
                y.to(run.device),
                layout.pipeline,
                run.par.pp_group,
                counted,
                mask=mask.to(run.device) if mask is not None else None,
            )
        total, count = total + s, count + c
    run.model.train(was)
    return total / max(count, 1)
