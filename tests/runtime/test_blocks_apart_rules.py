"""``runtime/regional.py`` on a plain ``nn`` model: the root compiled in place is no block compiled apart, the
``triton.cudagraphs`` option set to False captures nothing, and a cached module deep in a block counts."""

from __future__ import annotations

from torch import nn

from relcache.runtime.regional import cached_apart, captured_apart, compiled_apart


def model() -> nn.Sequential:
    return nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(2, 2))), nn.Linear(2, 2))


def test_the_root_compiled_in_place_is_no_block():
    root = model()
    root.compile(backend="eager")
    assert compiled_apart(root, [root[1]]) == {} and cached_apart(root, [root[1]]) == set()


def test_a_block_compiled_with_cuda_graphs_off_captures_nothing():
    root = model()
    root[0].compile(options={"triton.cudagraphs": False})
    assert compiled_apart(root, [root[0][0][0]]) == {"Sequential": 1}
    assert captured_apart(root, [root[0][0][0]]) == {}


def test_a_cached_module_nested_in_a_block_sits_in_it():
    root = model()
    root[0].compile(backend="eager")
    inner = root[0][0][0]  # two levels below the block
    assert cached_apart(root, [inner, root[1]]) == {id(inner)}
