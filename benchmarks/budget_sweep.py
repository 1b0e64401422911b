"""RFC(target_nfc=K) over a range of budgets on the shipped reference model: each budget's full steps and its
relative L1 error against full computation, per batch of 10 samples (classes ``seed..seed+9`` mod 10, generator
seeded with ``seed``). A larger budget should never be clearly worse; this is how the budget running out before
the last steps was found and checked (docs/spec.md, §Target NFC, rule 4).

    python benchmarks/budget_sweep.py --budgets 7 8 10 11 14 16 18 20 22 --seeds 0 1
"""

from __future__ import annotations

import argparse
import warnings

import torch

import relcache
from relcache.evaluation.metrics import relative_l1
from relcache.evaluation.reference import load_reference_transformer, sample_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[7, 8, 10, 11, 14, 16, 18, 20, 22])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    model = load_reference_transformer()
    print("seed K rel_l1 full_steps", flush=True)
    for seed in args.seeds:
        labels = (torch.arange(10) + seed) % 10
        ref = sample_digits(model, labels, generator=torch.Generator().manual_seed(seed))
        for k in args.budgets:
            relcache.enable(model, relcache.RFC(target_nfc=k))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the sampler's 50 steps are announced: nothing to warn of
                    out = sample_digits(model, labels, generator=torch.Generator().manual_seed(seed))
                full = relcache.stats(model).full_steps
            finally:
                relcache.disable(model)
            print(seed, k, f"{float(relative_l1(out, ref)):.5f}", full, flush=True)


if __name__ == "__main__":
    main()
