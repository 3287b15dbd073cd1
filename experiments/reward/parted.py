"""A batch in fixed parts, side by side on threads: its gradient as the sum of the
parts' gradients, and inference over the same parts.

Workers run torch on one thread: two intra-op threads spin against the other workers
on a busy machine. But reward_net is the longest chain of the default run, and for
much of it the only work left to run, so one thread would leave the other core idle.
So on a CPU its batches (the reward network's and fine-tuning's) are cut into
`CPU_PARTS` fixed parts, each part's forward and backward pass on a Python thread of
its own (torch releases the GIL inside its kernels), and the parts' gradients are
summed in order; its evaluations (Dice before and after, the anchors, the reward
network's val scores) go over the same parts. The parts do not depend on how many
threads run them, so one thread or several give the same bits; where the cores are
busy the operating system shares them, and nothing spins. A part is also faster per
image than the whole batch on one thread (its activations stay in the caches):
`python -m benchmarks backend` measures both.

The gradient is that of the whole batch's mean loss, up to float rounding: each part's
mean is weighted by its share of the rows. On a GPU a batch stays whole (the device is
the parallelism) and takes the plain `backward()`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

from sa2va_contract.worker import usable_cores

#: Parts of a batch on a CPU. Fixed, not the number of cores, so that a run gives the
#: same result on every machine.
CPU_PARTS = 2

T = TypeVar("T")

#: A part's losses: `rows` -> (the loss to minimise, then any values to report), each a
#: mean over the part's rows.
PartLoss = Callable[[slice], Sequence[torch.Tensor]]


def part_rows(size: int, parts: int) -> list[slice]:
    """`size` rows in at most `parts` contiguous slices, none empty, the larger first."""
    parts = max(1, min(parts, size))
    base, extra = divmod(size, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append(slice(start, stop))
        start = stop
    return bounds


class BatchParts:
    """A batch's rows in `parts` on `threads` (see the module's docstring): `gradients`
    sets `.grad` of `parameters` to the gradient of the batch's mean loss, and
    `side_by_side` runs other work (inference) over the same parts. `close()` ends its
    threads."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], parts: int, threads: int) -> None:
        self.parameters = list(parameters)
        self.parts = parts
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="batch-part") if parts > 1 and threads > 1 else None

    def gradients(self, loss_of: PartLoss, size: int) -> list[float]:
        """Fill the gradients for a batch of `size` rows; the batch's loss and reported
        values, as floats."""
        if self.parts == 1 or size <= 1:
            values = loss_of(slice(0, size))
            values[0].backward()
            return [float(v.detach()) for v in values]
        results = self.side_by_side(lambda rows: self._part(loss_of, rows, size), size)
        for i, parameter in enumerate(self.parameters):
            grads = [grads[i] for grads, _ in results if grads[i] is not None]
            total = None
            for grad in grads:  # in the parts' order, whatever order they finished in
                total = grad if total is None else total + grad
            parameter.grad = total
        return [sum(values[k] for _, values in results) for k in range(len(results[0][1]))]

    def side_by_side(self, work: Callable[[slice], T], size: int) -> list[T]:
        """`work` on each part of `size` rows, on the threads, the results in the parts'
        order. `work` must be safe to run on several threads at once."""
        rows = part_rows(size, self.parts)
        if self._pool is None or len(rows) == 1:
            return [work(r) for r in rows]
        return list(self._pool.map(work, rows))

    def _part(self, loss_of: PartLoss, rows: slice, size: int) -> tuple[tuple, list[float]]:
        share = (rows.stop - rows.start) / size
        values = [v * share for v in loss_of(rows)]
        grads = torch.autograd.grad(values[0], self.parameters, allow_unused=True)
        return grads, [float(v.detach()) for v in values]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def batch_parts(parameters: Sequence[torch.nn.Parameter], device: str | torch.device,
                threads_at_once: bool = True) -> BatchParts:
    """`CPU_PARTS` parts on a CPU, one thread per part as far as the cores go, where the
    model may run on several threads at once; else the whole batch."""
    if torch.device(device).type == "cpu" and threads_at_once:
        return BatchParts(parameters, CPU_PARTS, min(CPU_PARTS, usable_cores()))
    return BatchParts(parameters, 1, 1)
