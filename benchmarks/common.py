"""What the reference-model benchmarks share: generate the same seeds with and without a cache config."""

from __future__ import annotations

import argparse

import torch

import relcache
from relcache.evaluation.reference import sample_digits

INTERVAL_FOR_NFC = {14: 4, 11: 5, 10: 6, 8: 7, 7: 9}  # Interval(N, 2) on 50 steps has NFC 14, 11, 10, 8, 7


def generate(model: torch.nn.Module, labels: torch.Tensor, seed: int, config: relcache.CacheConfig | None,
             ) -> tuple[torch.Tensor, list[relcache.CacheStats]]:
    """Samples of one generation per batch of 10 (batch ``b`` seeded ``seed + b``), with ``config`` attached
    (None = full computation), and the stats of each batch's generation (empty for full computation)."""
    outs, stats = [], []
    for b, batch in enumerate(labels.split(10)):
        if config is not None:
            relcache.enable(model, config)
        try:
            outs.append(sample_digits(model, batch, generator=torch.Generator().manual_seed(seed + b)))
            if config is not None:
                stats.append(relcache.stats(model))
        finally:
            if config is not None:
                relcache.disable(model)
    return torch.cat(outs), stats


def reference_parser(doc: str | None, budgets: list[int], samples: int, out: str) -> argparse.ArgumentParser:
    """The options every reference-model benchmark takes: budgets, samples, seed, output path."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=int, default=budgets, choices=list(INTERVAL_FOR_NFC))
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out)
    return parser
