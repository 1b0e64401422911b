"""Operators one cached-step forecast launches (views excluded): RFE against RFC+'s predictor, order 2.

A count, the same on any device; the large-tensor operators are listed apart from those on 0-d or per-sample
``(batch,)`` tensors.

    python benchmarks/plus_ops.py
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from relcache import Relational
from relcache.methods.plus import RelationalPlus


class Count(TorchDispatchMode):
    """Records each operator called, with whether its output is a large tensor (more elements than the batch)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.ops = batch, []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view launches no kernel
            self.ops.append((func._schema.name, isinstance(out, torch.Tensor) and out.numel() > self.batch))
        return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 64, 128, generator=g) for _ in range(4)]
    for pred in (Relational(2), RelationalPlus(2)):
        state = pred.new_state()
        for t, x in zip([0, 1, 5, 11], xs, strict=True):  # uneven gaps, as RCS makes them
            pred.update(state, t, x, x * 2 + 1)
        row = torch.tensor([3.0, 1.5, 1.0, 0.75, 0.0])
        with torch.no_grad(), Count(2) as count:
            pred.forecast(state, xs[-1] + 0.1, row)
        large = [n for n, big in count.ops if big]
        print(f"{type(pred).__name__}: {len(count.ops)} operators, {len(large)} on large tensors ({', '.join(large)}), "
              f"{len(count.ops) - len(large)} on 0-d or per-sample tensors")


if __name__ == "__main__":
    main()
