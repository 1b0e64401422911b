"""Which pipeline is calling an enabled transformer, and what it says of its batch: read from the Python stack.

At each transformer call the generation rules (``generations.Generations``) ask which pipeline drives the model (a
pipeline relcache has not seen is watched from then on) and whether its batched calls carry classifier-free
guidance. The answer is the nearest frame whose ``self`` holds the model as its denoiser.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import diffusers.hooks
import diffusers.models
import torch
from torch import nn

_CALLER_DEPTH = 48  # frames searched above the transformer call for the pipeline driving it
# code that never is a pipeline's method: torch, diffusers' models and hooks, relcache's runtime. Their frames lie
# between every transformer call and its pipeline (8 of them under torch.compile), and reading a frame's locals
# copies them all, so they are passed over unread.
_MACHINERY = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, diffusers.hooks, diffusers.models))
_RUNTIME = os.path.dirname(__file__) + os.sep
_machinery_files: dict[str, bool] = {}  # per code file name: whether it is machinery
_TRANSFORMER_ATTRS = ("transformer", "transformer_2")  # pipeline attributes that hold a denoiser relcache serves


def _unwrap(module: Any) -> Any:
    """The module a ``torch.compile`` wrapper runs."""
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    return module


def _drives(obj: Any, model: nn.Module) -> bool:
    """Whether ``obj`` (a frame's ``self``) is a pipeline holding ``model`` as its denoiser; read from its instance
    dict, so no property of an arbitrary object runs."""
    if isinstance(obj, nn.Module):
        return False
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, dict):
        return False
    return any(_unwrap(attrs.get(name)) is model for name in _TRANSFORMER_ATTRS if attrs.get(name) is not None)


def calling_pipeline(model: nn.Module, frame: Any = None) -> tuple[Any, dict[str, Any]] | None:
    """(the pipeline whose method is calling ``model`` now, that frame's locals), or None (a hand-written loop).

    The nearest frame above ``frame`` (default: the caller's) whose ``self`` holds ``model`` as its transformer,
    searched up to ``_CALLER_DEPTH`` frames; only frames whose first argument is named ``self`` are read, and not
    those of ``_MACHINERY``."""
    frame = sys._getframe(1) if frame is None else frame
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return None
        code = frame.f_code
        machinery = _machinery_files.get(code.co_filename)
        if machinery is None:
            machinery = _machinery_files[code.co_filename] = code.co_filename.startswith((*_MACHINERY, _RUNTIME))
        if not machinery and code.co_argcount and code.co_varnames[0] == "self":
            local = frame.f_locals
            if _drives(local.get("self"), model):
                return local["self"], local
        frame = frame.f_back
    return None


def says_cfg(pipeline: Any, local: dict[str, Any]) -> bool | None:
    """Whether the calling pipeline says its batched calls carry classifier-free guidance: its
    ``do_classifier_free_guidance`` (a local of the call, else the pipeline's attribute), ``False`` when it runs
    CFG as separate calls (FLUX, HunyuanVideo: ``do_true_cfg``; their ``guidance_scale`` is embedded guidance),
    else its ``guidance_scale > 1`` (DiT). None when it says nothing."""
    said = local.get("do_classifier_free_guidance")
    if isinstance(said, bool):
        return said
    if "do_true_cfg" in local:
        return False
    if isinstance(getattr(type(pipeline), "do_classifier_free_guidance", None), property):
        try:
            return bool(pipeline.do_classifier_free_guidance)
        except Exception:  # noqa: BLE001 - a property reading state the call has not set: no answer
            pass
    scale = local.get("guidance_scale")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return scale > 1
    return None
