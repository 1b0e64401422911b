"""Do two checkouts generate the same samples? A refactor's check that behaviour is unchanged, bit for bit.

Generates a few digits with every method of ``relcache bench`` (at the chosen budgets) on the shipped reference model
and saves the samples, NFC and model-FLOPs fraction of each; ``--against`` compares with a file saved by another
checkout (run it there with ``PYTHONPATH=<that checkout>/src``) and lists every method whose samples differ.

    PYTHONPATH=/path/to/old/src python benchmarks/same_samples.py --out /tmp/old.pt
    python benchmarks/same_samples.py --out /tmp/new.pt --against /tmp/old.pt
"""

from __future__ import annotations

import argparse
import sys

import torch

import relcache
from relcache.evaluation.bench import default_methods
from relcache.evaluation.reference import load_reference_transformer, sample_digits


def samples(budgets: list[int], count: int) -> dict[str, tuple[torch.Tensor, int, float]]:
    model = load_reference_transformer()
    labels = torch.arange(count) % 10
    out = {}
    for method in default_methods(budgets=budgets):
        relcache.enable(model, method.config)
        try:
            images = sample_digits(model, labels, generator=torch.Generator().manual_seed(0))
            st = relcache.stats(model)
            out[method.label] = (images, st.nfc, st.model_flops_fraction)
        finally:
            relcache.disable(model)
        print(f"{method.label}: NFC {out[method.label][1]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=int, default=[14, 8])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--out", required=True, help="where to save this checkout's samples (.pt)")
    parser.add_argument("--against", help="a file saved by another checkout to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mine = samples(args.budgets, args.samples)
    torch.save(mine, args.out)
    if args.against:
        theirs = torch.load(args.against)
        differ = [k for k in theirs if k not in mine or not torch.equal(mine[k][0], theirs[k][0])
                  or mine[k][1:] != theirs[k][1:]]
        print(f"{len(theirs) - len(differ)} of {len(theirs)} methods identical; differ: {differ or 'none'}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
