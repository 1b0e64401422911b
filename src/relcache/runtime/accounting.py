"""FLOP accounting: what a generation ran and what full computation would have run (the stats that report it:
``stats.py``).

FLOPs are measured with ``torch.utils.flop_counter`` once per input shape, never under ``torch.compile``:

* each cached module's FLOPs, the first time it runs on given input shapes (inside the whole-call
  measurement when one is running, as a difference);
* the rest of the transformer (embeddings, norms, gates, final layer: everything outside the cached modules),
  at the first call with a given signature (the shapes of its tensor arguments).

A step adds what ran to the ``executed`` counters and what full computation would have run to the ``full``
counters; a step that runs half of a CFG batch counts against the full batch (``scale`` 2).

(choice) Counting never breaks a generation. ``torch.utils.flop_counter`` is a dispatch mode, and some operators do
not run under it (flex attention, in torch 2.11 to 2.14: a ``TypeError`` from its compiled eager path, which also
leaves dynamo's caches for torch's own functions unusable). When a measured call raises, the meter forgets what dynamo
compiled of torch's own code, undoes what the call recorded (``run_call``'s ``snapshot``) and runs it again without
counting: if that succeeds, counting was at fault and stops for the session, and the stats give every FLOP field
as NaN with the reason (``unknown``); if it fails too, the model's own error propagates. ``enable(...,
count_flops=False)`` never counts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

#: the input shapes of one module call, one tuple per input tensor
Shapes = tuple[tuple[int, ...], ...]
_NAN = float("nan")


def _grouped_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """torch's own SDPA formula, with grouped-query attention (fewer key/value heads than query heads, each shared
    by a group of query heads: Cosmos 3, ACE-Step) counted as the kernels compute it, every query head against its
    group's key/value head. torch counts it so itself from 2.12 on; 2.11's formula refuses such shapes."""
    heads = query_shape[-3]
    if len(key_shape) == 4 and key_shape[-3] != heads and key_shape[-3] > 0 and heads % key_shape[-3] == 0:
        key_shape = (*key_shape[:-3], heads, *key_shape[-2:])
        value_shape = (*value_shape[:-3], heads, *value_shape[-2:])
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _torch_counts_grouped_queries() -> bool:
    """Whether torch's SDPA formula counts grouped-query shapes (torch 2.12 on)."""
    try:
        sdpa_flop_count((1, 2, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1))
    except AssertionError:
        return False
    return True


def _extra_formulas() -> dict[Any, Any]:
    """The entries relcache adds to torch's FLOP registry. On CPU, scaled_dot_product_attention lowers to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which the registry lacks (attention's QK^T and AV would
    count as zero): counted with torch's own SDPA formula. Where that formula refuses grouped-query attention
    (torch 2.11), the GPU kernels' SDPA entries count through ``_grouped_sdpa_flops`` too."""
    names = ["_scaled_dot_product_flash_attention_for_cpu"]
    if not _torch_counts_grouped_queries():
        names += ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_cudnn_attention"]
    ops = [getattr(torch.ops.aten, name, None) for name in names]
    return {op: _grouped_sdpa_flops for op in ops if op is not None}


_EXTRA = _extra_formulas()


class _TotalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every count goes to the total ("Global"), the only number
    relcache reads. torch's tracker hooks every module call and registers backward hooks on its inputs that require
    grad, which raises ("Expected gradient function to be set") on a view of a parameter taken under ``no_grad``
    (requires grad, no grad_fn: Bria FIBO 2's perceiver queries, ``latent_queries[:n].expand(...)``)."""

    parents = ("Global",)

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _EagerFlopCounter(FlopCounterMode):
    """A ``FlopCounterMode`` under which every ``torch.compile``'d function runs eagerly
    (``torch.compiler.set_stance("force_eager")``): dynamo refuses to compile under a dispatch mode and marks the code
    it met then as skipped for good, so a regional compile's blocks (``compile_repeated_blocks``) reached by a measured
    call were never compiled in that process (found by review, 2026-12-04)."""

    def __enter__(self) -> _EagerFlopCounter:
        self._stance = torch.compiler.set_stance("force_eager")  # set now, restored by its __exit__
        try:
            return super().__enter__()
        except BaseException:
            self._stance.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._stance.__exit__(None, None, None)


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU attention and tracks no modules (totals only), with every
    compiled function run eagerly while it counts; use as a context manager."""
    counter = _EagerFlopCounter(display=False, custom_mapping=_EXTRA)
    counter.mod_tracker = _TotalOnly()  # torch 2.13's attribute: entered and exited by the mode, read per count
    return counter


#: ``stats``' reason when ``enable(..., count_flops=False)``
COUNTING_OFF = "FLOP counting is turned off (enable(..., count_flops=False))"


def _forget_torch_code() -> None:
    """Reset dynamo's per-code state (compiled entries, skip marks) of torch's own functions it has seen: what a
    dispatch mode that failed inside torch-compiled code (flex attention's eager path) leaves behind makes every later
    call of that code fail. The user's compiled code (outside torch) is left alone. Private dynamo API: skipped where
    it is missing."""
    try:
        from torch._dynamo import convert_frame
        from torch._dynamo.eval_frame import reset_code
        seen = list(convert_frame.input_codes.seen) + list(convert_frame.output_codes.seen)
    except (ImportError, AttributeError):  # pragma: no cover - other torch versions
        return
    root = os.path.dirname(torch.__file__) + os.sep
    with convert_frame.compile_lock:
        for ref in seen:
            code = ref()
            if code is not None and code.co_filename.startswith(root):
                reset_code(code)


def _from_counting(err: BaseException) -> bool:
    """Whether ``err`` came from FLOP counting rather than from the model: raised inside a dispatch mode (torch's
    FLOP counter or one under it) or by torch's dispatcher finding no rule for an operator under such a mode (flex
    attention's higher-order operator). An error of the model's own propagates as it would without relcache. Running
    out of memory is never counting's fault, even inside its mode: rerunning uncounted while the failed run's
    traceback still holds its tensors failed again and hid the first error (FLUX.1 on an H200, 2026-12-04)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return False
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "__torch_dispatch__" or code.co_filename.endswith("flop_counter.py"):
            return True
        tb = tb.tb_next
    return "no implementation found" in str(err) or "__torch_dispatch__" in str(err)


def measure_flops(fn: Callable[[], Any], within: torch.nn.Module | None = None) -> float:
    """FLOPs of running ``fn`` under torch's FLOP counter, or NaN when counting fails on it (flex attention): the
    process is left as it was; an error of ``fn``'s own propagates. For whole generations (``relcache bench``).
    ``within``: count only inside that module's calls (a pipeline's transformer, not its VAE or text encoders: the
    whole pipeline's count moved the ratio towards 1, found by review)."""
    try:
        if within is None:
            with flop_counter() as counter:
                fn()
            return float(counter.get_total_flops())
        with ModuleFlops(within) as counted:
            fn()
        return float(counted.total)
    except Exception as err:
        if not _from_counting(err):
            raise
        _forget_torch_code()
        return _NAN


class ModuleFlops:
    """FLOPs inside the outermost calls of ``module`` only, while entered: a counter entered by a forward pre-hook and
    left by a forward hook (which runs also when the call raises)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.total = 0
        self._depth = 0
        self._counter: FlopCounterMode | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> ModuleFlops:
        self._handles = [self.module.register_forward_pre_hook(self._pre),
                         self.module.register_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def _pre(self, *_: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            self._counter = flop_counter()
            self._counter.__enter__()

    def _post(self, *_: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)
            self.total += counter.get_total_flops()


def _reason(err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"FLOP counting failed on this model and is off for this session ({type(err).__name__}: {first[:200]})"


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The shapes of the transformer's tensor arguments: what its FLOPs depend on."""
    shapes: list[Any] = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    shapes += sorted((k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return tuple(shapes)


@dataclass
class Counters:
    """FLOPs of one context in one generation: of the cached modules, and of the whole transformer."""

    executed: float = 0.0  # cached modules that actually ran
    full: float = 0.0  # what those modules would have run with full computation
    model_executed: float = 0.0
    model_full: float = 0.0


class FlopMeter:
    """FLOPs measured once per input shape, and added to a context's counters at every call. ``enabled`` False:
    nothing is measured (``unknown`` says why)."""

    def __init__(self, enabled: bool = True) -> None:
        self.module: dict[tuple[int, Shapes], float] = {}  # (module index, input shapes) -> FLOPs
        self.other: dict[tuple[Any, ...], float] = {}  # (model, call signature) -> FLOPs outside the cached modules
        # which of the session's transformers runs the call (Wan 2.2's experts: their index; else None): two experts
        # called on the same shapes each have their FLOPs outside the cached modules, and each expert's first call
        # of a shape is the one that measures its modules where they cannot measure themselves (in blocks compiled
        # one by one). Keyed by shapes alone, the second expert's modules were never measured there (its FLOP
        # fraction NaN), and RFC's decision in a compiled block then entered the counter from traced code (an
        # AssertionError); found by a test, 2026-12-06.
        self.model: int | None = None
        self.counter: FlopCounterMode | None = None  # around the whole transformer call, while one measures
        self.shared_saved = 0.0  # FLOPs of shared copies not computed in the current call
        self.counted = False  # the current call ran eagerly and was counted by ``run_call``
        self.reported: set[int] = set()  # the cached modules that counted themselves in the current call
        self.unknown: str | None = None if enabled else COUNTING_OFF  # why FLOPs are not counted

    def run_call(
        self, counters: Counters, scale: int, forward: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any], snapshot: Callable[[], Callable[[], None]] | None = None,
    ) -> Any:
        """Call the transformer and count the whole call; ``scale`` full-batch rows per row that runs. ``snapshot``
        saves what the call's modules change and returns how to restore it: a measured call that fails runs again
        from there, uncounted."""
        if torch.compiler.is_compiling():
            return forward(*args, **kwargs)  # no FLOP counting in compiled code
        self.counted = True
        if self.unknown is not None:
            return forward(*args, **kwargs)
        sig = (self.model, signature(args, kwargs))
        executed, full = counters.executed, counters.full
        self.shared_saved = 0.0
        if sig in self.other:
            out = forward(*args, **kwargs)
        else:
            restore = snapshot() if snapshot is not None else None
            try:
                with flop_counter() as counter:
                    self.counter = counter
                    try:
                        out = forward(*args, **kwargs)
                    finally:
                        self.counter = None
            except Exception as err:  # counting failed: run again uncounted (the model's own errors propagate)
                if not _from_counting(err):
                    raise
                _forget_torch_code()
                if restore is not None:
                    restore()
                return self._uncounted(err, forward, args, kwargs)
            self.other[sig] = max(float(counter.get_total_flops()) - (counters.executed - executed), 0.0)
        other = self.other.get(sig, 0.0)
        counters.model_executed += other - self.shared_saved + counters.executed - executed
        counters.model_full += other * scale + counters.full - full
        return out

    def run_module(self, key: tuple[int, Shapes] | None, forward: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """Run a cached module; measure its FLOPs the first time it runs under ``key`` (None: do not measure)."""
        if key is None or key in self.module or self.unknown is not None:
            return forward(*args, **kwargs)
        if self.counter is not None:  # the whole transformer is being measured: take the difference
            before = self.counter.get_total_flops()
            out = forward(*args, **kwargs)
            self.module[key] = float(self.counter.get_total_flops() - before)
            return out
        try:
            with flop_counter() as counter:
                out = forward(*args, **kwargs)
        except Exception as err:  # as in run_call; the module's own forward changes no relcache state
            if not _from_counting(err):
                raise
            _forget_torch_code()
            return self._uncounted(err, forward, args, kwargs)
        self.module[key] = float(counter.get_total_flops())
        return out

    def _uncounted(self, err: Exception, forward: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """Run again without counting after a measured run raised ``err``: counting is off from now on if that
        succeeds; if it raises too, the model itself failed, and counting stays on."""
        self.unknown = _reason(err)
        try:
            return forward(*args, **kwargs)
        except BaseException:
            self.unknown = None
            raise

    def module_flops(self, idx: int, shapes: Shapes) -> float:
        """FLOPs of module ``idx`` on inputs of ``shapes``: measured, else scaled from another batch size (linear)."""
        got = self.module.get((idx, shapes))
        if got is not None:
            return got
        for (j, other), flops in self.module.items():
            if j == idx and len(other) == len(shapes) and other[0][0] and all(
                a[1:] == b[1:] for a, b in zip(other, shapes, strict=True)
            ):
                return flops * shapes[0][0] / other[0][0]
        return 0.0

    def count_computed(self, counters: Counters, idx: int, shapes: Shapes, scale: int) -> None:
        """Module ``idx`` ran on ``shapes``."""
        self.reported.add(idx)
        flops = self.module.get((idx, shapes), 0.0)
        counters.executed += flops
        counters.full += flops * scale

    def count_forecast(self, counters: Counters, idx: int, shapes: Shapes, scale: int) -> None:
        """Module ``idx`` was forecast instead of running on ``shapes``."""
        self.reported.add(idx)
        counters.full += self.module_flops(idx, shapes) * scale

    def count_unreported(self, counters: Counters, full: bool, call_shapes: list[tuple[int, Shapes]], scale: int
                         ) -> None:
        """The cached modules of a call counted by ``run_call`` that did not count themselves: they ran inside
        compiled code while the step itself did not (a regional compile's blocks, ``compile_repeated_blocks``), where
        nothing counts. As in ``count_compiled_call``, each computed at a full step and forecast otherwise (before
        2026-12-04 they were left out, and the FLOP fractions came out wrong without notice: found by review)."""
        for idx, shapes in call_shapes:
            if idx in self.reported:
                continue
            flops = self.module_flops(idx, shapes)
            counters.full += flops * scale
            counters.model_full += flops * scale
            if full:
                counters.executed += flops
                counters.model_executed += flops

    def count_compiled_call(self, counters: Counters, full: bool, call_shapes: list[tuple[int, Shapes]],
                            sig: tuple[Any, ...], scale: int) -> None:
        """A call whose forward ran compiled (no FLOP counting inside graphs): every cached module computed (a full
        step) or forecast, and the rest of the transformer as measured at this ``sig``'s eager call (``sig``: the
        call's ``(model, signature)``, as ``run_call`` keys it)."""
        modules = sum(self.module_flops(i, sh) for i, sh in call_shapes)
        other = self.other.get(sig, 0.0)
        counters.full += modules * scale
        counters.model_full += (other + modules) * scale
        counters.model_executed += other + (modules if full else 0.0)
        if full:
            counters.executed += modules

    def count_skipped_call(self, counters: Counters, call_shapes: list[tuple[int, Shapes]], sig: tuple[Any, ...]
                           ) -> None:
        """A whole transformer call was skipped (split CFG's "uncond" call rebuilt by CFG-Cache)."""
        modules = sum(self.module_flops(i, sh) for i, sh in call_shapes)
        counters.full += modules
        counters.model_full += self.other.get(sig, 0.0) + modules
