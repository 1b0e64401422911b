"""The README's table of supported models is the one scripts/supported_models.py generates from the registry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("supported_models", ROOT / "scripts" / "supported_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_equals_the_generated_one():
    script = _script()
    assert script.main(["--check", str(ROOT / "README.md")]) == 0


def test_the_table_lists_every_supported_class_once():
    from relcache.models import supported_models

    script = _script()
    rows = script.table().splitlines()[2:]
    for cls in supported_models():
        assert sum(f"`{cls}`" in r for r in rows) == 1, cls


def test_a_stale_table_is_caught(tmp_path):
    script = _script()
    stale = tmp_path / "README.md"
    stale.write_text(f"x\n{script.BEGIN}\n| family |\n{script.END}\ny\n")
    assert script.main(["--check", str(stale)]) == 1
    assert script.main(["--write", str(stale)]) == 0 and script.main(["--check", str(stale)]) == 0
    assert stale.read_text().startswith("x\n") and stale.read_text().endswith("y\n")


def test_every_listed_pipeline_and_class_exists_in_diffusers():
    """The table names real diffusers pipelines and transformer classes (a typo would mislead users)."""
    diffusers = __import__("diffusers")
    from packaging.version import Version

    from relcache.models.base import registered_rows

    # rows of families a newer diffusers than the oldest supported one added (checked on the newest)
    newer = ({"Kandinsky 6", "SANA-WM refiner", "FLUX.3", "Bria FIBO 2"}
             if Version(diffusers.__version__) < Version("0.42") else set())
    for row in registered_rows():
        for name in (*row.pipeline.split(", "), *row.model_classes):
            assert hasattr(diffusers, name) or row.family in newer, (row.family, name)


def test_custom_models_doc_lists_every_shape_with_its_modules():
    """docs/custom-models.md's shape table names every shape of base.SHAPES with its modules in call order."""
    from relcache.models.base import SHAPES

    doc = (ROOT / "docs" / "custom-models.md").read_text()
    for name, slots in SHAPES.items():
        line = next((ln for ln in doc.splitlines() if ln.startswith(f"| `{name}` |")), None)
        assert line is not None, name
        modules = line.split("|")[2]
        positions = [modules.find(f"`{s.attr}`") for s in slots]
        assert all(p >= 0 for p in positions) and positions == sorted(positions), name
        assert all(("(joint)" in modules.split(f"`{s.attr}`")[1][:9]) == s.joint for s in slots), name


def test_every_transformer_with_cache_mixin_is_served():
    """README ("All 34 of diffusers 0.42.1's transformer classes with CacheMixin are served"): every class diffusers
    exports with ``CacheMixin`` is served but the two Qwen-Image ControlNets, which are not denoisers."""
    import diffusers.models
    from diffusers.models import CacheMixin

    from relcache.models import supported_models

    found = set()
    for name in dir(diffusers.models):
        if name.startswith("_") or name == "CacheMixin":
            continue
        try:
            cls = getattr(diffusers.models, name)
        except (ImportError, AttributeError, RuntimeError):  # an optional backend missing
            continue
        if isinstance(cls, type) and issubclass(cls, CacheMixin):
            found.add(name)
    controlnets = {"QwenImageControlNetModel", "QwenImageMultiControlNetModel"}
    assert found - set(supported_models()) <= controlnets
    if diffusers.__version__ == "0.42.1":
        assert len(found - controlnets) == 34
