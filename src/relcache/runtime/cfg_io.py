"""A transformer call's arguments and outputs as CFG-Cache handles them: the arguments cut to the conditional half of a
CFG batch, the sample found in (and put back into) an output, and the output fields besides the sample that it
cannot rebuild (docs/spec.md, §CFG-Cache)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

#: position ids whose first dim is not the batch
_UNBATCHED_KWARGS = frozenset({"img_ids", "txt_ids"})
#: list or tuple keyword arguments whose names hold one of these are rotary tables or positions, never rows
_TABLE_WORDS = ("rope", "rotary", "freqs")


def _first(out: Any) -> Any:
    """A transformer output's first field (a tuple's first item, a diffusers output dataclass's first field)."""
    if isinstance(out, tuple):
        return out[0]
    if dataclasses.is_dataclass(out):
        return getattr(out, dataclasses.fields(out)[0].name)
    raise TypeError(f"CFG-Cache cannot find the sample in a transformer output of type {type(out).__name__}")


def sample_of(out: Any) -> torch.Tensor:
    """The sample tensor of a transformer output (a tensor, a tuple, or a diffusers output dataclass; its first field
    may be a list of one tensor, Cosmos 3's)."""
    if isinstance(out, torch.Tensor):
        return out
    got = _first(out)
    if isinstance(got, list) and len(got) == 1 and isinstance(got[0], torch.Tensor):
        return got[0]
    if not isinstance(got, torch.Tensor):
        raise TypeError(f"CFG-Cache cannot find the sample in a transformer output holding {type(got).__name__}")
    return got


def with_sample(out: Any, sample: torch.Tensor) -> Any:
    """``out`` with its sample replaced, same container type."""
    if isinstance(out, torch.Tensor):
        return sample
    value = [sample] if isinstance(_first(out), list) else sample
    if isinstance(out, tuple):
        return (value, *out[1:])
    return dataclasses.replace(out, **{dataclasses.fields(out)[0].name: value})


def other_outputs(out: Any) -> list[str]:
    """The fields of a transformer output besides its sample that hold tensors (LTX-2's audio, say): CFG-Cache
    rebuilds the sample's unconditional half only."""
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        named = [(f"output {j}", v) for j, v in enumerate(out)]
    elif isinstance(out, tuple):
        named = list(zip(out._fields, out, strict=True))
    elif dataclasses.is_dataclass(out):
        named = [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    else:
        return []

    def holds_tensor(v: Any) -> bool:
        return isinstance(v, torch.Tensor) or isinstance(v, (list, tuple)) and any(map(holds_tensor, v))

    return [name for name, v in named[1:] if holds_tensor(v)]


def slice_batch(
    args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, rows: slice, axes: dict[str, int] | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The transformer's arguments cut to ``rows`` of its ``batch``: every tensor whose first dim is the batch, also
    the tensors of three or more dims directly inside a list or tuple (SD3 ControlNet's residuals, Bria FIBO's text
    encoder layers: ``(batch, tokens, dim)``), and each keyword argument named in ``axes`` (``Adapter.batch_axes``)
    on its axis there. Never cut: FLUX's ids, lists and tuples of rotary tables or positions (a keyword naming rope,
    rotary or freqs, and in any list 1-d and 2-d tensors: Kandinsky 5's positions, Allegro's per-axis tables, whose
    lengths can equal the batch), NamedTuples."""

    def cut(v: Any, axis: int = 0) -> Any:
        if isinstance(v, torch.Tensor) and v.ndim > axis and v.shape[axis] == batch:
            return v[(slice(None),) * axis + (rows,)]
        return v

    def cut_items(v: Any) -> Any:
        if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):  # not a NamedTuple: its type takes fields
            return type(v)(cut(t) if isinstance(t, torch.Tensor) and t.ndim >= 3 else t for t in v)
        return cut(v)

    def cut_kw(k: str, v: Any) -> Any:
        if k in _UNBATCHED_KWARGS or isinstance(v, (list, tuple)) and any(word in k for word in _TABLE_WORDS):
            return v
        if isinstance(v, dict):
            return {kk: cut(vv) for kk, vv in v.items()}
        return cut_items(v) if k not in (axes or {}) else cut(v, axes[k])

    return tuple(cut_items(a) for a in args), {k: cut_kw(k, v) for k, v in kwargs.items()}
