"""A user's own local diffusers pipeline as a bench sampler: ``relcache bench --model DIR``.

A directory is recognised by its ``model_index.json`` alone (checked before anything is loaded): its transformer
class names the family. Class-conditional pipelines (DiT) sample class labels; text-conditioned ones (PixArt, SD3,
FLUX, Wan, CogVideoX, HunyuanVideo, Latte) sample prompts, indexed like labels (sample ``i`` gets condition
``i % len(conditions)``); video ones return ``(batch, frames, channels, height, width)``. Samples are in [-1, 1].
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Family:
    """What the bench needs to know about a pipeline family."""

    name: str
    text: bool  # conditioned on prompts (else on class labels)
    video: bool
    frames_arg: str | None = None  # the pipeline's frame-count argument
    frames_step: int = 1  # frame counts must be 1 + a multiple of this (the VAE's temporal compression)
    default_guidance: float | None = None  # what the bench uses without --guidance (None: the pipeline's own)
    sized: bool = True  # the pipeline takes ``height``/``width`` (DiT's makes its transformer's sample size only)


#: transformer class -> family
FAMILIES = {
    "DiTTransformer2DModel": Family("dit", text=False, video=False, default_guidance=1.5, sized=False),
    "PixArtTransformer2DModel": Family("pixart", text=True, video=False),
    "SD3Transformer2DModel": Family("sd3", text=True, video=False),
    "FluxTransformer2DModel": Family("flux", text=True, video=False),
    "WanTransformer3DModel": Family("wan", text=True, video=True, frames_arg="num_frames", frames_step=4),
    "CogVideoXTransformer3DModel": Family("cogvideox", text=True, video=True, frames_arg="num_frames",
                                          frames_step=4),
    "HunyuanVideoTransformer3DModel": Family("hunyuan_video", text=True, video=True, frames_arg="num_frames",
                                             frames_step=4),
    "LatteTransformer3DModel": Family("latte", text=True, video=True, frames_arg="video_length"),
}

FAMILY_NAMES = ", ".join(f.name for f in FAMILIES.values())

#: prompts for text-conditioned pipelines without ``--prompts``: varied subjects, styles, scenes and compositions
DEFAULT_PROMPTS = (
    "a red fox sitting in fresh snow, morning light",
    "a bowl of ramen with a soft-boiled egg, top view, studio photo",
    "an astronaut riding a horse on the moon, digital art",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old fisherman with a grey beard",
    "a futuristic city skyline at night with flying cars and neon signs",
    "a cozy reading nook with a cat asleep on a stack of books",
    "a macro photo of a dewdrop on a green leaf",
    "a medieval castle on a hill surrounded by fog",
    "a steaming cup of coffee on a wooden table next to a window in the rain",
    "a pixel art treasure chest in a dungeon",
    "a golden retriever puppy running through a field of sunflowers",
    "an oil painting of a stormy sea with a small sailing boat",
    "a minimalist logo of a mountain and the sun, flat vector",
    "a street market in Marrakech, crowded, vivid colors",
    "a glass teapot with blooming tea on a black background",
    "a snowy mountain range reflected in a still lake",
    "a robot chef cooking pancakes in a bright kitchen",
    "a hand-drawn map of a fantasy island with a dragon",
    "a black and white photo of a jazz trio on stage",
    "three apples and a pear on a table, still life in the style of Cezanne",
    "a hummingbird hovering next to a pink flower, high-speed photo",
    "an isometric cutaway of a tiny apartment with furniture",
    "a desert road with a vintage car under the milky way",
    "a child's crayon drawing of a house, a tree and the family",
    "a sign that says 'OPEN 24 HOURS' above a diner door",
    "an underwater coral reef with a sea turtle and small fish",
    "a paper origami crane on a white desk, soft shadows",
    "a knight in ornate armor standing in a field of red poppies",
    "a bustling train station in Tokyo during rush hour, motion blur",
    "a bonsai tree in a ceramic pot, studio lighting",
    "a thunderstorm over a wheat field, dramatic clouds",
)


def inspect_dir(path: str | Path) -> tuple[str, Family]:
    """(pipeline class, family) of a local pipeline directory; ``ValueError`` with the reason otherwise.

    Reads only ``model_index.json`` (nothing is loaded), so a wrong directory fails at once."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}")
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path} has no model_index.json")
    try:
        data = json.loads(index.read_text())
        pipeline_class = data.get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"cannot read {index}: {err}") from None
    entry = data.get("transformer")
    transformer_class = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if transformer_class not in FAMILIES:
        what = f"a {transformer_class} transformer" if transformer_class else "no transformer"
        raise ValueError(f"{path} holds a {pipeline_class} with {what}; supported families: {FAMILY_NAMES}")
    second = data.get("transformer_2")
    if isinstance(second, list) and len(second) == 2 and second[1] is not None:
        # found by review: the CLI caches the bare transformer, so transformer_2 ran uncached and the table's NFC
        # counted the first expert's steps only
        raise ValueError(f"{path} holds a {pipeline_class} with two transformers (transformer and transformer_2, "
                         "experts as in Wan 2.2): the command caches the bare transformer, so the second would run "
                         "uncached and the table would count half the generation; cache both in Python with "
                         "relcache.enable(pipe, ...) (docs/spec.md, \"Several transformers\")")
    return pipeline_class, FAMILIES[transformer_class]


def num_classes(path: str | Path) -> int | None:
    """The number of classes of a class-conditional pipeline's transformer (its ``num_embeds_ada_norm``), or None."""
    config = Path(path) / "transformer" / "config.json"
    try:
        return int(json.loads(config.read_text())["num_embeds_ada_norm"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: families whose pipelines check ``height``/``width`` against a fixed multiple of pixels
_FIXED_MULTIPLE = {"wan": 16, "hunyuan_video": 16}
#: families whose latents must divide by the transformer's patch: pixels are a multiple of the VAE's scale times the
#: patch (FLUX packs 2x2 latents whatever its ``patch_size``; its pipeline would resize the image without a word)
_PATCHED = {"sd3": None, "flux": 2, "cogvideox": None, "latte": None}


def size_multiple(path: str | Path, family: Family) -> tuple[int, str]:
    """(the multiple of pixels ``family``'s pipeline in ``path`` needs of a height or width, why): read from the
    directory's VAE and transformer configs (nothing is loaded), so a size it would refuse, or break on, after
    loading is refused before. 8 where the pipeline needs no more (PixArt bins sizes itself)."""
    if family.name in _FIXED_MULTIPLE:
        return _FIXED_MULTIPLE[family.name], "its pipeline checks it"
    if family.name not in _PATCHED:
        return 8, "the VAE's scale"
    configs = []
    for part in ("vae", "transformer"):
        try:
            configs.append(json.loads((Path(path) / part / "config.json").read_text()))
        except (OSError, ValueError):
            return 8, "the VAE's scale"  # unreadable: the pipeline's own check decides
    vae, transformer = configs
    scale = 2 ** (len(vae.get("block_out_channels") or [0] * 4) - 1)
    patch = _PATCHED[family.name] or transformer.get("patch_size") or 1
    patch = patch if isinstance(patch, int) else 1
    return max(scale * patch, 1), f"the VAE's scale {scale} x the transformer's patch {patch}"


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file, one a line (blank lines skipped); ``ValueError`` if it is missing or has none."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one a line)")
    return prompts


def check_frames(family: Family, frames: int | None) -> None:
    """``ValueError`` unless ``frames`` suits ``family`` (None: the pipeline's default)."""
    if frames is None:
        return
    if not family.video:
        raise ValueError(f"{family.name} makes images; --frames is for video families")
    if frames < 1 or (frames - 1) % family.frames_step:
        step = family.frames_step
        examples = ", ".join(str(1 + step * k) for k in range(3))
        rule = "an integer >= 1" if step == 1 else f"1 + a multiple of {step} ({examples}, ...)"
        raise ValueError(f"{family.name} needs a frame count that is {rule}, got {frames}")


def check_one_call_per_step(scheduler: Any, num_steps: int) -> None:
    """``ConfigError`` where ``scheduler`` makes another number of transformer calls than ``num_steps`` (Heun, KDPM2,
    PNDM's Runge-Kutta steps: about two per step). The commands count budgets, intervals and calibrated steps in
    steps of one call, and announce ``num_steps``: such a scheduler ran twice the calls, the later ones all cached,
    and ``calibrate`` printed steps that the pipeline then refused (found by review). A scheduler whose step count
    cannot be read without the pipeline (FLUX's dynamic shift needs ``mu``) is let through."""
    import copy

    trial = copy.deepcopy(scheduler)
    try:
        trial.set_timesteps(num_steps)
    except Exception:  # noqa: BLE001 -- the pipeline passes what this scheduler needs: nothing to compare here
        return
    calls = len(trial.timesteps)
    if calls != num_steps:
        raise ConfigError(
            f"the pipeline's scheduler ({type(scheduler).__name__}) makes {calls} transformer calls for {num_steps} "
            "steps: the bench and calibrate count budgets in steps of one call. Save the pipeline with a "
            "scheduler of one call a step (DDIM, Euler, DPM-Solver++, UniPC, flow-matching Euler) for these commands")


def load_sampler(path: str | Path, family: Family, *, prompts: Sequence[str] | None = None,
                 frames: int | None = None, height: int | None = None, width: int | None = None,
                 device: str | torch.device | None = None) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """(transformer, sampler) of the pipeline in ``path``, on ``device`` (default: CUDA when there is one).

    The sampler has the bench's signature ``(transformer, labels, num_steps, guidance_scale, generator)``: ``labels``
    are class labels, or for text families indices into ``prompts``. ``guidance_scale`` None keeps the pipeline's
    default. Caching is enabled on the bare transformer, so the sampler announces each generation's steps."""
    import torch
    from diffusers import DiffusionPipeline

    from ..api import begin_generation

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    fixed: dict[str, Any] = {}
    if height is not None:
        fixed["height"] = height
    if width is not None:
        fixed["width"] = width
    if frames is not None:
        fixed[family.frames_arg] = frames
    if family.name == "pixart":
        # PixArt snaps sizes to its aspect-ratio table, which exists only for 256, 512, 1024 and 2048 pixels
        size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        fixed["use_resolution_binning"] = size in (256, 512, 1024, 2048)
    prompt_list = list(prompts or DEFAULT_PROMPTS)

    def sample(transformer: torch.nn.Module, labels: torch.Tensor, num_steps: int = 50,
               guidance_scale: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        check_one_call_per_step(pipe.scheduler, num_steps)
        begin_generation(transformer, num_steps)
        kwargs = dict(fixed)
        if family.text:
            kwargs["prompt"] = [prompt_list[i] for i in labels.tolist()]
        else:
            kwargs["class_labels"] = labels.tolist()
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        with torch.no_grad():
            out = pipe(**kwargs, num_inference_steps=num_steps, generator=generator, output_type="pt")
        x = out.frames if family.video else out.images
        return torch.as_tensor(x).float().cpu() * 2 - 1

    return pipe.transformer, sample
