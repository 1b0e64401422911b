"""Model adapters: which modules of a transformer to cache and what their input is. They know no method.

A cached module's *input* is the tensor it receives (for DiT: the adaLN-modulated LayerNorm of the residual
stream) and its *output* is what it returns, before the block applies its gate and residual add. The block's
own code keeps running around the module, so gates, norms and residuals are always recomputed.

Here too: the registry (``register_adapter``, ``find_adapter``, ``supported_models``), the table of block shapes
(``SHAPES``) that one generic adapter (``TableAdapter``) reads from a declarative ``ModelRow`` per model family, and
what several adapters share (the joint two-stream input, ``modules_of_blocks``, the feed-forward-chunking guard).
An adapter file imports only this module from the models package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..methods.config import MODULE_KINDS

# returns the module's input, or a tuple of inputs paired element-wise with a tuple output (dual-stream)
InputFn = Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor | tuple[torch.Tensor, ...]]


class NoInputFound(TypeError):
    """``first_tensor_input`` found no input (``CachedModule.inputs`` names the module)."""


def first_tensor_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The module's first positional argument, or its ``hidden_states`` keyword. Where that is a list of tensors (a
    transformer taking one latent tensor per sample, Z-Image), its first tensor: the runtime reads the device and
    dtype of a transformer call's input from it, and its leading dimension (then not the batch) for CFG batching."""
    if args:
        found = args[0]
    elif "hidden_states" in kwargs:
        found = kwargs["hidden_states"]
    else:
        raise NoInputFound(f"no positional argument and no hidden_states= (keywords: {sorted(kwargs)})")
    while isinstance(found, (list, tuple)) and found:  # Z-Image omni: a list of lists
        found = found[0]
    return found


@dataclass(frozen=True)
class CachedModule:
    """One module whose output is cached. Listed in execution order (the stats list them so); RCS's probe is the
    cached module a step's forward calls first, whatever the listed order."""

    name: str
    module: nn.Module
    kind: str  # "attn", "cross_attn" or "mlp"
    input_of: InputFn = first_tensor_input
    #: which of a joint module's inputs RCS reads and the call's rows are cut by (Cosmos 3: the generation stream,
    #: second; its first, the text, is the same at every step)
    probe: int = 0
    #: False: the module's tensors have no batch axis (one packed sequence, ``(tokens, dim)``: Cosmos 3); the runtime
    #: sees them with a leading axis of one, so that per-sample norms span the whole sequence
    batched: bool = True

    def inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The module's inputs as the runtime reads them: a tuple, each with its batch axis."""
        try:
            got = self.input_of(args, kwargs)
        except NoInputFound as err:  # found by review: a bare TypeError that named neither module nor remedy
            raise ConfigError(f"cannot find the input of cached module {self.name!r}: {err}; give the adapter an "
                              "input_of that returns it (CustomAdapter input_of=, docs/custom-models.md)") from None
        ins = got if isinstance(got, tuple) else (got,)
        for x in ins or (None,):  # found by review: a bare AttributeError ('shape', 'unsqueeze') named neither
            if not isinstance(x, torch.Tensor):
                raise ConfigError(f"the input of cached module {self.name!r} must be a tensor or a tuple of tensors, "
                                  f"got {type(x).__name__ if ins else 'an empty tuple'}: check the adapter's input_of "
                                  "(CustomAdapter input_of=, docs/custom-models.md)")
        return ins if self.batched else tuple(x.unsqueeze(0) for x in ins)

    def outputs(self, out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The module's outputs as the runtime reads them: a tuple, each with its batch axis. Anything but a tensor or
        a tuple (a NamedTuple too) of tensors is refused, naming the module: a cached step could not rebuild it."""
        if isinstance(out, torch.Tensor):
            return (out,) if self.batched else (out.unsqueeze(0),)
        outs = out if isinstance(out, tuple) else (out,)
        if not all(isinstance(o, torch.Tensor) for o in outs) or not outs:
            got = type(out).__name__ if not isinstance(out, tuple) else (
                f"a tuple holding {', '.join(type(o).__name__ for o in outs) or 'nothing'}")
            raise UnsupportedModelError(
                f"cached module {self.name!r} returned {got}; a cached module must return a tensor or a tuple of "
                "tensors (wrap it to return only its tensors, or leave it out of the adapter's modules)")
        return outs if self.batched else tuple(o.unsqueeze(0) for o in outs)

    def returned(self, outs: Sequence[torch.Tensor], layout: type | None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Forecast ``outs`` (as ``outputs`` gives them) in the layout the module returns: ``layout`` is the type of
        the tuple it returned (a NamedTuple is rebuilt as one), None for a single tensor."""
        got = tuple(outs) if self.batched else tuple(o.squeeze(0) for o in outs)
        if layout is None:
            return got[0]
        if layout is tuple:
            return got
        make = getattr(layout, "_make", None)  # a NamedTuple; other tuple types (torch.return_types) take a sequence
        return make(got) if make is not None else layout(got)


@dataclass(frozen=True)
class Modulation:
    """Projections whose input depends only on the step's timestep and on conditioning fixed for a generation (the
    adaLN projections of DiT-style blocks), so that every step's can be computed at once (``runtime/modulation.py``).

    ``projections``: the modules, each called with one tensor of rows ``(B, in)``. ``inputs(timesteps, args, kwargs,
    outputs)``: for the ``T`` timesteps given as the model receives them and a call with ``args``/``kwargs``, each
    projection's input at every step, ``(T·B, in)`` step-major, formed as the model forms it (``outputs``: the
    sources' outputs below, already computed, or None without sources).
    ``timestep(args, kwargs)``: the call's timestep tensor; ``conditioning(args, kwargs)``: the other tensors the
    inputs depend on (DiT: the class labels).

    ``sources`` (optional): modules the model calls only on the call's timestep and conditioning, whose outputs feed
    the projections (DiT: each block's timestep-and-class embedding); ``source_outputs(timesteps, args, kwargs)``: each
    one's output at every step, ``(T·B, out)`` step-major. Where the table serves a call they are read from it too, so
    that a step neither computes them nor, compiled, traces them (each is dozens of dynamo guards per call)."""

    projections: tuple[nn.Module, ...]
    inputs: Callable[[torch.Tensor, tuple[Any, ...], dict[str, Any], list[torch.Tensor] | None], list[torch.Tensor]]
    timestep: Callable[[tuple[Any, ...], dict[str, Any]], Any]
    conditioning: Callable[[tuple[Any, ...], dict[str, Any]], tuple[torch.Tensor, ...]]
    sources: tuple[nn.Module, ...] = ()
    source_outputs: Callable[[torch.Tensor, tuple[Any, ...], dict[str, Any]], list[torch.Tensor]] | None = None


class Adapter:
    """Base class: subclasses name the model classes they serve and list their cached modules."""

    #: class names served (matched against the model's class and its bases)
    model_classes: tuple[str, ...] = ()
    #: whether the model's pipeline batches classifier-free guidance conditional half first (DiT) rather than
    #: unconditional half first (PixArt, Latte, CogVideoX, ...); CFG-Cache reads it when ``cond_first`` is None
    cfg_cond_first: bool = False
    #: keyword arguments whose batch axis is not the first, by name: their axis (HiDream stacks its Llama layers
    #: first, ``(layers, batch, tokens, dim)``). CFG-Cache cuts every other tensor argument on its first axis.
    batch_axes: dict[str, int] = {}

    def matches(self, model: nn.Module) -> bool:
        """True if this adapter serves ``model``."""
        names = {cls.__name__ for cls in type(model).__mro__}
        return any(name in names for name in self.model_classes)

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        """The modules to cache, in execution order."""
        raise NotImplementedError

    def timestep_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The timestep the transformer was called with (used to notice a new generation), or None."""
        return kwargs.get("timestep")

    def hidden_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The transformer call's latents: the runtime reads the call's device and dtype from them, tells calls apart
        by them, and reads a CFG batch on their leading axis. The default: ``first_tensor_input``."""
        return first_tensor_input(args, kwargs)

    def shared_modules(self, model: nn.Module) -> list[list[nn.Module]]:
        """Groups of copies of one module that a transformer call calls with the same arguments (DiT's per-block
        timestep-and-class embedding). relcache computes a group once per call where the copies' weights are
        equal (``relcache.runtime.shared``). The default: none."""
        return []

    def modulation(self, model: nn.Module) -> Modulation | None:
        """The projections ``relcache.enable(..., batch_modulation=True)`` computes for every step at once, or None
        (the default: the model has none relcache knows)."""
        return None

    def extra_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this transformer call is an extra call within a step that caching must leave alone (SD3's
        skip-layer guidance pass): it runs as the plain model, counts no step and touches no cache."""
        return False

    def pipeline_transformers(self, pipeline: Any) -> list[tuple[str, nn.Module]]:
        """The ``(attribute, transformer)`` pairs of ``pipeline`` that one generation runs, in the order the
        generation first calls them (Wan 2.2's high-noise expert ``transformer``, then the low-noise expert
        ``transformer_2``). The default: ``pipeline.transformer`` only."""
        return [("transformer", pipeline.transformer)]

    def spatial_grid(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> SpatialGrid | None:
        """For CFG-Cache's 2-D FFT over image space: a pair of functions turning the transformer's output into a
        ``(..., H, W)`` layout and back, for models whose output is a token sequence (FLUX). None (the default):
        the output already ends with its two spatial axes."""
        return None


#: (to the ``(..., H, W)`` layout, back to the model's layout)
SpatialGrid = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Make ``adapter`` available to ``relcache.enable``; later registrations take precedence."""
    _ADAPTERS.insert(0, adapter)
    return adapter


def supported_models() -> list[str]:
    """The model class names some registered adapter serves."""
    return sorted({name for a in _ADAPTERS for name in a.model_classes})


def unsupported(reason: str) -> UnsupportedModelError:
    """The error for an object no adapter serves: ``reason``, then the supported models and the way to add one."""
    return UnsupportedModelError(
        f"{reason}. Supported models: {', '.join(supported_models())}. For your own DiT, pass "
        "adapter=relcache.CustomAdapter(...) (see docs/custom-models.md)."
    )


def find_adapter(model: nn.Module, adapter: Adapter | None = None) -> Adapter:
    """The adapter for ``model`` (or ``adapter`` if given), else an error listing what is supported."""
    if adapter is not None:
        return adapter
    for candidate in _ADAPTERS:
        if candidate.matches(model):
            return candidate
    raise unsupported(f"relcache has no adapter for {type(model).__name__}")


# -- what adapters share: block tables, input functions, module lists ----------------------------------------------

def joint_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of a joint (two-stream) attention, ``(hidden_states, encoder_hidden_states)`` by keyword or position,
    paired element-wise with its ``(image_out, text_out)`` (FLUX, SD3, HunyuanVideo, CogVideoX)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if "encoder_hidden_states" in kwargs:
        return hidden, kwargs["encoder_hidden_states"]
    return hidden, args[0 if "hidden_states" in kwargs else 1]


def with_joint_inputs(modules: list[CachedModule], attrs: tuple[str, ...] = ("attn",)) -> list[CachedModule]:
    """``modules`` with the joint attentions named ``attrs`` taking both streams as inputs (paired with outputs)."""
    return [replace(m, input_of=joint_inputs) if m.name.rsplit(".", 1)[-1] in attrs else m for m in modules]


def modules_of_blocks(
    blocks: Sequence[nn.Module], prefix: str, attrs: Sequence[tuple[str, str]]
) -> list[CachedModule]:
    """Cached modules ``<prefix>.<i>.<attr>`` of each block, for ``(attr, kind)`` pairs in execution order (for
    hand-written adapters; attributes a block lacks or holds as None are skipped)."""
    return [CachedModule(f"{prefix}.{i}.{attr}", getattr(block, attr), kind) for i, block in enumerate(blocks)
            for attr, kind in attrs if getattr(block, attr, None) is not None]


def refuse_ff_chunking(blocks: Iterable[nn.Module]) -> None:
    """ConfigError if a block chunks its feed-forward (diffusers' ``set_chunk_feed_forward``, which the models'
    ``enable_forward_chunking`` calls): the block then calls ``ff`` once per chunk, not once per step."""
    if any(getattr(block, "_chunk_size", None) is not None for block in blocks):
        raise ConfigError(
            "feed-forward chunking (set_chunk_feed_forward / enable_forward_chunking) calls ff several times per "
            "step; disable it (disable_forward_chunking, or chunk_size=None) before enabling relcache"
        )


# -- the shape table: one generic adapter reads a declarative row per model family ---------------------------------


@dataclass(frozen=True)
class Slot:
    """One cached module of a block: its attribute (dotted for a sub-module), its kind and what its input is.

    ``joint``: the module takes two streams, ``(hidden_states, encoder_hidden_states)`` by keyword or position, and
    returns ``(image_out, text_out)``, each output paired with its own stream's input (docs/spec.md, "Input and
    output"). Otherwise the input is the first positional argument or ``hidden_states=``."""

    attr: str
    kind: str
    joint: bool = False
    probe: int = 0  # ``CachedModule.probe``

    def __post_init__(self) -> None:
        if self.kind not in MODULE_KINDS:  # a FasterCache or modules= filter would otherwise find no module
            raise ConfigError(f"Slot {self.attr!r} kind must be one of {MODULE_KINDS}, got {self.kind!r}")


#: the block shapes relcache knows, each the ``Slot`` s of one block in execution order. A slot a block lacks (or
#: holds as None) is skipped, so optional modules (SD3.5's ``attn2``, DiT's missing ``attn2``) need no own shape.
SHAPES: dict[str, tuple[Slot, ...]] = {
    # diffusers' BasicTransformerBlock (DiT, PixArt, Latte's spatial blocks): self-attn, cross-attn, feed-forward
    "basic": (Slot("attn1", "attn"), Slot("attn2", "cross_attn"), Slot("ff", "mlp")),
    # a self-attention block without cross-attention (Latte's temporal blocks)
    "self_attn_ff": (Slot("attn1", "attn"), Slot("ff", "mlp")),
    # self-attention, cross-attention to the text, feed-forward named ``ffn`` (Wan, SkyReels-V2)
    "cross_attn_ffn": (Slot("attn1", "attn"), Slot("attn2", "cross_attn"), Slot("ffn", "mlp")),
    # double-stream block: joint attention over both streams, then the image and text MLPs (FLUX, HunyuanVideo)
    "double_stream": (Slot("attn", "attn", joint=True), Slot("ff", "mlp"), Slot("ff_context", "mlp")),
    # MMDiT block (SD3): the joint attention, SD3.5's image-only ``attn2``, the two MLPs
    "mmdit": (Slot("attn", "attn", joint=True), Slot("attn2", "attn"), Slot("ff", "mlp"),
              Slot("ff_context", "mlp")),
    # single-stream block on one joint sequence: the MLP's input matmul, then the attention (FLUX)
    "single_stream": (Slot("proj_mlp", "mlp"), Slot("attn", "attn")),
    # the same, the attention taking the sequence split back into its two streams (HunyuanVideo)
    "single_stream_joint": (Slot("proj_mlp", "mlp"), Slot("attn", "attn", joint=True)),
    # expert block (CogVideoX): joint attention, then one feed-forward over the concatenated streams
    "joint_attn_ff": (Slot("attn1", "attn", joint=True), Slot("ff", "mlp")),
    # double-stream block with the MLPs named per stream (Qwen-Image)
    "double_stream_img_txt": (Slot("attn", "attn", joint=True), Slot("img_mlp", "mlp"), Slot("txt_mlp", "mlp")),
    # double-stream block with the joint attention named ``attn1`` (Mochi; its last block has no text MLP)
    "double_stream_attn1": (Slot("attn1", "attn", joint=True), Slot("ff", "mlp"), Slot("ff_context", "mlp")),
    # single-stream block whose one module fuses attention and MLP (FLUX.2's parallel block: QKV and MLP input in
    # one matmul, one output projection over both branches)
    "single_stream_fused": (Slot("attn", "attn"),),
    # joint attention only (CogView4: its block calls ``ff`` twice, once per stream, so the MLP is not cacheable)
    "joint_attn": (Slot("attn1", "attn", joint=True),),
    # attention and an MLP named ``img_mlp`` (Qwen-Image 2.1: one text+image sequence; Nucleus-MoE-Image: the image
    # stream, attending to the text as extra keys and values)
    "single_stream_img_mlp": (Slot("attn", "attn"), Slot("img_mlp", "mlp")),
    # self-attention and feed-forward named ``attn`` and ``feed_forward`` (Lumina2)
    "attn_feed_forward": (Slot("attn", "attn"), Slot("feed_forward", "mlp")),
    # self-attention and feed-forward named ``attention`` and ``feed_forward`` (Z-Image, Ideogram 4)
    "attention_feed_forward": (Slot("attention", "attn"), Slot("feed_forward", "mlp")),
    # the same with a cross-attention to the text between them, ``cross_attention``, in some blocks only (Bria FIBO 2's
    # injection blocks)
    "attention_cross_feed_forward": (Slot("attention", "attn"), Slot("cross_attention", "cross_attn"),
                                     Slot("feed_forward", "mlp")),
    # self-attention and feed-forward named ``attn`` and ``ff`` (MiniMax-H3's packed text+audio+video sequence,
    # AuraFlow's single blocks, Krea 2; FLUX.3's blocks: attn and ff in parallel on one modulated norm)
    "attn_ff": (Slot("attn", "attn"), Slot("ff", "mlp")),
    # self-attention and MLP named ``self_attn`` and ``mlp`` (OmniGen's decoder layers)
    "self_attn_mlp": (Slot("self_attn", "attn"), Slot("mlp", "mlp")),
    # attention, then a gated MLP written inline in the block: its two input matmuls ``gate_proj`` and ``up_proj``
    # (each on the modulated norm; the activation, product and ``down_proj`` run every step, as FLUX's proj_mlp) (PRX)
    "attention_gate_up": (Slot("attention", "attn"), Slot("gate_proj", "mlp"), Slot("up_proj", "mlp")),
    # self-attention, cross-attention, MLP named ``self_attn``, ``cross_attn``, ``mlp`` (ACE-Step)
    "self_cross_mlp": (Slot("self_attn", "attn"), Slot("cross_attn", "cross_attn"), Slot("mlp", "mlp")),
    # the same named ``self_attention``, ``cross_attention``, ``feed_forward`` (Kandinsky 5's visual blocks)
    "self_cross_feed_forward": (Slot("self_attention", "attn"), Slot("cross_attention", "cross_attn"),
                                Slot("feed_forward", "mlp")),
    # audio+video block (LTX-2): each stream's self-attention, then each stream's cross-attention to its text, the
    # cross-modal attentions (video queries on audio, audio queries on video), then each stream's feed-forward
    "audio_video": (Slot("attn1", "attn"), Slot("audio_attn1", "attn"), Slot("attn2", "cross_attn"),
                    Slot("audio_attn2", "cross_attn"), Slot("audio_to_video_attn", "cross_attn"),
                    Slot("video_to_audio_attn", "cross_attn"), Slot("ff", "mlp"), Slot("audio_ff", "mlp")),
    # double-stream block with an optional text cross-attention on the joint attention's image output (Motif-Video)
    "double_stream_cross": (Slot("attn", "attn", joint=True), Slot("cross_attn", "cross_attn"), Slot("ff", "mlp"),
                            Slot("ff_context", "mlp")),
    # ``single_stream_joint`` with the same optional cross-attention after the attention (Motif-Video)
    "single_stream_joint_cross": (Slot("proj_mlp", "mlp"), Slot("attn", "attn", joint=True),
                                  Slot("cross_attn", "cross_attn")),
    # joint attention named ``attn1``, then one MLP per stream named ``ff`` and ``txt_ff`` (EasyAnimate's MMDiT blocks)
    "joint_attn_ff_txt_ff": (Slot("attn1", "attn", joint=True), Slot("ff", "mlp"), Slot("txt_ff", "mlp")),
}


@dataclass(frozen=True)
class Blocks:
    """One kind of block of a model: the attribute holding them (a dotted path) and their shape (a ``SHAPES`` key
    or the slots themselves)."""

    attr: str
    shape: str | tuple[Slot, ...]

    def slots(self) -> tuple[Slot, ...]:
        """The shape's slots."""
        if isinstance(self.shape, str):
            if self.shape not in SHAPES:
                raise ConfigError(f"unknown block shape {self.shape!r}; known shapes: {', '.join(SHAPES)}")
            return SHAPES[self.shape]
        return self.shape


@dataclass(frozen=True)
class ModelRow:
    """A model family as data: which transformer classes, which blocks (in execution order) of which shape.

    ``interleave``: the groups alternate layer by layer (Latte: spatial block ``i``, then temporal block ``i``)
    instead of running one after the other. ``refuse_chunking``: the blocks offer diffusers' feed-forward chunking,
    which calls ``ff`` several times per call, so enabling refuses it. ``family`` and ``pipeline`` are for the
    README's table (scripts/supported_models.py)."""

    family: str
    pipeline: str
    model_classes: tuple[str, ...]
    groups: tuple[Blocks, ...]
    interleave: bool = False
    refuse_chunking: bool = False
    cfg_cond_first: bool = False
    #: the pipeline attributes holding the transformers one generation runs, in the order it first calls them
    #: (Wan 2.2: ``("transformer", "transformer_2")``, the high-noise then the low-noise expert); absent or None
    #: attributes are skipped (Wan 2.1 pipelines hold ``transformer_2=None``)
    experts: tuple[str, ...] = ("transformer",)
    #: False: the blocks run one packed sequence without a batch axis (``CachedModule.batched``)
    batched: bool = True


def _resolve_blocks(model: nn.Module, attr: str) -> Sequence[nn.Module]:
    try:
        return model.get_submodule(attr)
    except AttributeError as err:
        raise ConfigError(f"{type(model).__name__} has no block list {attr!r}") from err


def modules_of_row(model: nn.Module, row: ModelRow) -> list[CachedModule]:
    """The cached modules a row names on ``model``, in execution order."""
    groups = [(_resolve_blocks(model, g.attr), g.attr, g.slots()) for g in row.groups]
    if row.refuse_chunking:
        refuse_ff_chunking(block for blocks, _, _ in groups for block in blocks)
    out: list[CachedModule] = []
    layered = [groups] if row.interleave else [[g] for g in groups]
    for layer_groups in layered:
        for i, layer in enumerate(zip(*(blocks for blocks, _, _ in layer_groups), strict=True)):
            for block, (_, prefix, slots) in zip(layer, layer_groups, strict=True):
                for slot in slots:
                    try:
                        module = block.get_submodule(slot.attr)
                    except AttributeError:
                        continue
                    fn = joint_inputs if slot.joint else first_tensor_input
                    out.append(CachedModule(f"{prefix}.{i}.{slot.attr}", module, slot.kind, fn, slot.probe,
                                            row.batched))
    return out


class TableAdapter(Adapter):
    """The generic adapter: caches what its ``ModelRow`` names. Subclass it for what a row cannot say (an extra
    call, a spatial grid, shared modules); a subclass may set ``default_row`` so that it is built without one."""

    default_row: ModelRow | None = None

    def __init__(self, row: ModelRow | None = None) -> None:
        row = row if row is not None else type(self).default_row
        if row is None:
            raise TypeError(f"{type(self).__name__} needs a ModelRow")
        self.row = row
        self.model_classes = row.model_classes
        self.cfg_cond_first = row.cfg_cond_first

    def cached_modules(self, model: nn.Module) -> list[CachedModule]:
        return modules_of_row(model, self.row)

    def pipeline_transformers(self, pipeline: Any) -> list[tuple[str, nn.Module]]:
        found = [(attr, getattr(pipeline, attr, None)) for attr in self.row.experts]
        return [(attr, model) for attr, model in found if isinstance(model, nn.Module)]


def register_row(row: ModelRow | None = None, adapter_class: type[TableAdapter] = TableAdapter) -> TableAdapter:
    """Register the generic adapter (or ``adapter_class``) for ``row`` (default: the class's ``default_row``)."""
    adapter = adapter_class(row)
    register_adapter(adapter)
    return adapter


def registered_rows() -> list[ModelRow]:
    """The rows of every registered table adapter, in registration order (the README's table)."""
    return [a.row for a in reversed(_ADAPTERS) if isinstance(a, TableAdapter)]
