"""The rules of one group of shared copies (``runtime/shared.py``), checked on plain ``nn`` modules: which copies
count as equal to the first, when that is checked again, and when a call returns the previous call's output."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from relcache.runtime.shared import SharedGroup, SharedHook, _same_key


class Counting(nn.Module):
    """``x * w + b``, counting its forward calls."""

    def __init__(self, w: float = 2.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))
        self.calls = 0

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        self.calls += 1
        return x * self.w


def group_of(*modules: nn.Module) -> SharedGroup:
    group = SharedGroup(list(modules))
    group._verify()
    return group


def call(group: SharedGroup, index: int, *args: object, **kwargs: object) -> tuple[torch.Tensor, float]:
    return group.call(index, group.modules[index], args, kwargs)


@torch.no_grad()
def test_copies_of_one_class_with_another_configuration_are_not_members():
    """Same class, no tensors to compare, another ``repr`` (LeakyReLU's slope): not a member."""
    assert group_of(nn.LeakyReLU(0.1), nn.LeakyReLU(0.1), nn.LeakyReLU(0.2)).members == {0, 1}


@torch.no_grad()
def test_copies_differing_in_one_element_are_not_members():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert group_of(a, b).members == {0, 1}
    b.weight[0, 0] += 1
    assert group_of(a, b).members == {0}


@torch.no_grad()
def test_a_module_without_tensors_is_a_member_of_its_equal_copies():
    assert group_of(nn.SiLU(), nn.SiLU()).members == {0, 1}


@torch.no_grad()
def test_equal_values_under_other_tensor_names_or_dtypes_are_not_members():
    class Named(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.register_parameter(name, nn.Parameter(torch.ones(2)))

        def extra_repr(self) -> str:
            return "same"

    assert group_of(Named("a"), Named("a"), Named("b")).members == {0, 1}
    single, half = nn.Linear(2, 2), nn.Linear(2, 2).half()
    for p in [*single.parameters(), *half.parameters()]:
        nn.init.ones_(p)  # equal values, exact in either dtype
    assert group_of(single, half).members == {0}


@torch.no_grad()
def test_offloaded_copies_share_nothing():
    a, b, c = Counting(), Counting(), Counting()
    c._hf_hook = object()  # accelerate's hook
    assert group_of(a, b, c).members == {0, 1}
    a._hf_hook = object()
    assert group_of(a, b).members == frozenset()


@torch.no_grad()
def test_a_parameter_changed_within_a_generation_is_compared_again_at_the_next_call():
    a, b = Counting(), Counting()
    group = group_of(a, b)
    assert group.members == {0, 1}
    group.end_call()
    b.w.mul_(3)  # in place: the version moves
    x = torch.ones(1)
    assert call(group, 0, x)[0].item() == 2.0
    assert call(group, 1, x)[0].item() == 6.0  # computed, not the memo
    assert group.members == {0}
    group.end_call()
    b.w.data = torch.tensor([2.0])  # new storage (no version): equal again
    assert call(group, 0, x)[0].item() == 2.0
    assert group.members == {0, 1}


@torch.no_grad()
def test_a_parameter_object_replaced_is_noticed_at_the_next_generation():
    a, b = Counting(), Counting()
    group = group_of(a, b)
    b.w = nn.Parameter(torch.tensor([5.0]))
    group.new_generation()
    x = torch.ones(1)
    call(group, 0, x)
    assert group.members == {0}
    assert call(group, 1, x)[0].item() == 5.0


@torch.no_grad()
def test_the_memo_is_dropped_at_the_end_of_a_call():
    a, b = Counting(), Counting()
    group = group_of(a, b)
    x = torch.ones(1)
    call(group, 0, x)
    call(group, 1, x)
    assert (a.calls, b.calls) == (1, 0)
    group.end_call()
    call(group, 1, x)
    assert (a.calls, b.calls) == (1, 1)  # the same arguments in the next transformer call: computed again


@torch.no_grad()
def test_a_copy_that_is_no_member_never_gets_the_memo():
    a, b = Counting(2.0), Counting(3.0)
    group = group_of(a, b)
    x = torch.ones(1)
    assert call(group, 0, x)[0].item() == 2.0
    assert call(group, 1, x)[0].item() == 3.0


@torch.no_grad()
def test_an_output_or_argument_written_in_place_is_not_reused():
    a, b, c = Counting(), Counting(), Counting()
    group = group_of(a, b, c)
    x = torch.ones(1)
    out, _ = call(group, 0, x)
    out.add_(1)  # the caller wrote the output in place
    assert call(group, 1, x)[0].item() == 2.0 and b.calls == 1
    x.add_(1)  # the argument written in place
    assert call(group, 2, x)[0].item() == 4.0 and c.calls == 1


@torch.no_grad()
def test_plain_arguments_must_be_equal_and_of_one_type():
    a, b = Counting(), Counting()
    group = group_of(a, b)
    x = torch.ones(1)
    call(group, 0, x, 1)
    call(group, 1, x, True)  # 1 == True, but another type
    assert b.calls == 1
    x1, x2 = torch.ones(1), torch.ones(1)
    assert not _same_key([(0, x1, 0)], [(0, x2, 0)])  # equal values, other tensors
    assert not _same_key([(0, x1, 0)], [(0, x1, 1)])  # the same tensor at another version
    assert not _same_key([("scale", 1, -1)], [("shift", 1, -1)])  # another keyword
    assert _same_key([(0, x1, 0), ("scale", 1, -1)], [(0, x1, 0), ("scale", 1, -1)])


@torch.no_grad()
def test_a_memo_hit_reports_one_copys_flops_as_saved():
    a, b = Counting(), Counting()
    group = group_of(a, b)
    x = torch.ones(3)
    group.flops[((0, (3,)),)] = 7.0
    assert call(group, 0, x)[1] == 0.0
    assert call(group, 1, x)[1] == 7.0


class _Host:
    def __init__(self, sharing: bool = True, counter: object = None) -> None:
        self._sharing, self.counter, self.saved = sharing, counter, []

    def sharing(self) -> bool:
        return self._sharing

    def flop_counter_now(self) -> object:
        return self.counter

    def add_saved_flops(self, flops: float) -> None:
        self.saved.append(flops)


def hooks_on(group: SharedGroup, host: _Host) -> list[SharedHook]:
    hooks = []
    for i, module in enumerate(group.modules):
        hook = SharedHook(group, i, host)
        hook.fn_ref = SimpleNamespace(original_forward=module.forward)
        hooks.append(hook)
    return hooks


def test_the_hook_shares_only_with_autograd_off_in_eval_mode_during_a_call():
    a, b = Counting(), Counting()
    x = torch.ones(1)

    def calls_of_b(host: _Host, grad: bool = False, train: bool = False) -> int:
        b.calls = 0
        group = group_of(a, b)
        first, second = hooks_on(group, host)
        a.train(train), b.train(train)
        with torch.set_grad_enabled(grad):
            first.new_forward(a, x)
            second.new_forward(b, x)
        return b.calls

    assert calls_of_b(_Host()) == 0  # shared
    assert calls_of_b(_Host(), grad=True) == 1
    assert calls_of_b(_Host(), train=True) == 1
    assert calls_of_b(_Host(sharing=False)) == 1  # no transformer call running


@torch.no_grad()
def test_the_measured_call_computes_every_copy_and_notes_one_copys_flops():
    class Counter:
        total = 0

        def get_total_flops(self) -> int:
            return self.total

    counter = Counter()
    a, b = Counting().eval(), Counting().eval()
    group = group_of(a, b)
    host = _Host(counter=counter)
    first, second = hooks_on(group, host)
    x = torch.ones(2)

    def counted(module: nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            counter.total += 5
            return module(x)
        return forward

    first.fn_ref.original_forward, second.fn_ref.original_forward = counted(a), counted(b)
    first.new_forward(a, x)
    second.new_forward(b, x)
    assert b.calls == 1  # computed, though a member with the same arguments
    assert group.flops == {((0, (2,)),): 5.0}
    host.counter = None
    group.end_call()
    first.new_forward(a, x)
    second.new_forward(b, x)
    assert b.calls == 1 and host.saved == [5.0]
