"""runtime/generations.py: what a scheduler announces, when a generation starts, and which pipeline drives the
model. Each test fails on a hand-made mutation of that file (named in its docstring) that the rest of the suite let
pass."""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from conftest import dit_inputs, dit_pipe, run_loop
from diffusers import DDIMScheduler, DiTPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch import nn

import relcache
from relcache import FORA, RFC, TaylorSeer
from relcache.runtime.callers import calling_pipeline
from relcache.runtime.watching import steps_to_run, timesteps_to_run


def _second(a: DiTPipeline, scheduler: DDIMScheduler | None = None) -> DiTPipeline:
    """A pipeline around ``a``'s transformer and VAE (``scheduler``: shared, else one of its own)."""
    b = DiTPipeline(transformer=a.transformer, vae=a.vae,
                    scheduler=scheduler or DDIMScheduler.from_config(a.scheduler.config))
    b.set_progress_bar_config(disable=True)
    return b


# -- what a scheduler announces -------------------------------------------------------------------
def test_steps_and_timesteps_to_run_start_at_the_begin_index():
    """Guards ``steps_to_run``'s floor at 0 and ``timesteps_to_run``'s slice from the begin index (mutants: a
    negative count past the end; every timestep, begin index ignored)."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    assert steps_to_run(scheduler) == 10
    assert torch.equal(timesteps_to_run(scheduler), scheduler.timesteps)
    scheduler.set_begin_index(4)  # img2img: the first 4 timesteps are skipped
    assert steps_to_run(scheduler) == 6
    assert torch.equal(timesteps_to_run(scheduler), scheduler.timesteps[4:])
    past = types.SimpleNamespace(timesteps=torch.arange(3), begin_index=5)
    assert steps_to_run(past) == 0 and len(timesteps_to_run(past)) == 0


def test_a_deep_copy_of_a_patched_scheduler_gets_the_plain_method_bound_to_the_copy():
    """A deep copy of the scheduler leaves the wrapper out (the scheduler's ``__getstate__`` while watched); one of
    its ``__dict__`` alone (diffusers' panorama pipeline saves scheduler states so) goes through
    ``MethodPatch.__deepcopy__`` (mutant: removed, so the copy kept a wrapper holding a deep copy of the runtime,
    the model included)."""
    from relcache.runtime.patches import MethodPatch

    pipe = dit_pipe()
    with relcache.cached(pipe, TaylorSeer(2)):
        twin = copy.deepcopy(pipe.scheduler)
        method = twin.set_timesteps
        assert getattr(method, "__self__", None) is twin
        assert getattr(method, "__func__", None) is DDIMScheduler.set_timesteps
        state = copy.deepcopy({"set_timesteps": vars(pipe.scheduler)["set_timesteps"]})["set_timesteps"]
        assert not isinstance(state, MethodPatch)
        assert getattr(state, "__func__", None) is DDIMScheduler.set_timesteps


@pytest.mark.parametrize("how", ["copy", "pickle"])
def test_a_shallow_copy_of_a_patched_scheduler_is_a_plain_scheduler_of_its_own(how):
    """A shallow copy (or a pickled one) of a watched scheduler shared relcache's wrapper, which acts on the original:
    the copy's ``set_timesteps`` set the original's timesteps and left the copy's alone, also after ``disable``
    (found by review). The copy now gets the class's method; the original stays watched, and plain after
    ``disable`` (no wrapper, no ``__getstate__`` of relcache's left in its ``__dict__``)."""
    import pickle

    pipe = dit_pipe()
    before = dict(vars(pipe.scheduler))
    with relcache.cached(pipe, TaylorSeer(2)):
        twin = copy.copy(pipe.scheduler) if how == "copy" else pickle.loads(pickle.dumps(pipe.scheduler))
        assert "set_timesteps" not in vars(twin) and "__getstate__" not in vars(twin)
        pipe.scheduler.set_timesteps(3)
        twin.set_timesteps(9)
        assert len(pipe.scheduler.timesteps) == 3 and len(twin.timesteps) == 9
        assert "set_timesteps" in vars(pipe.scheduler)  # still watched
    assert vars(pipe.scheduler).keys() == before.keys() | {"timesteps", "num_inference_steps"}
    assert "__getstate__" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)


# -- when a generation starts -----------------------------------------------------------------------
def test_after_a_pipeline_call_a_bare_loop_with_rising_timesteps_stays_one_generation():
    """Guards ``begin``'s ``marked = marked or ...`` (mutant: a generation the runtime notices unmarks, so the
    timestep rule comes back). After a pipeline call (its scheduler marked a generation), a bare loop whose
    timesteps rise (DDIM inversion) is one generation of 6 steps (FORA(2): full at 0, 1, 3, 5), not 6 generations
    of 1."""
    pipe = dit_pipe()
    x, y = dit_inputs()
    with relcache.cached(pipe, FORA(2)):
        pipe([1, 7], num_inference_steps=3, output_type="latent")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # 6 steps run where the pipeline announced 3
            run_loop(pipe.transformer, x, y, steps=6, begin=False, timesteps=[0, 100, 200, 300, 400, 500])
        st = relcache.stats(pipe)
    assert st.num_steps == 6 and st.full_steps == [0, 1, 3, 5]


def test_a_generation_noticed_after_a_pipeline_call_has_no_step_count():
    """Guards ``begin`` forgetting ``num_steps`` when none is announced (mutant: keep the previous count). A bare loop
    right after a 4-step pipeline call starts a generation (the call ended one) that announces nothing: RFC's
    target NFC refuses it as on a fresh enable, where the previous count planned a 6-step loop's budget for 4 steps
    and cached its last two (found by review). Interval schedules need no count, and run."""
    pipe = dit_pipe()
    x, y = dit_inputs()
    with relcache.cached(pipe, RFC(target_nfc=2)):
        pipe([1, 7], num_inference_steps=4, output_type="latent")
        with pytest.raises(relcache.ConfigError, match="target_nfc needs the number of steps"):
            run_loop(pipe.transformer, x, y, steps=6, begin=False)
    with relcache.cached(pipe, FORA(2, warmup=1)):
        pipe([1, 7], num_inference_steps=4, output_type="latent")
        run_loop(pipe.transformer, x, y, steps=6, begin=False)
        st = relcache.stats(pipe)
    assert st.num_steps == 6 and st.full_steps == [0, 2, 4]


def test_begin_generation_without_a_count_forgets_the_previous_one():
    """Guards the same for ``begin_generation(m)`` without ``num_steps`` after one with it."""
    pipe = dit_pipe()
    x, y = dit_inputs()
    with relcache.cached(pipe, RFC(target_nfc=2)):
        relcache.begin_generation(pipe.transformer, 4)
        run_loop(pipe.transformer, x, y, steps=4, begin=False)
        relcache.begin_generation(pipe.transformer)
        with pytest.raises(relcache.ConfigError, match="target_nfc needs the number of steps"):
            run_loop(pipe.transformer, x, y, steps=6, begin=False)


class _Sampler:
    """A user's hand-written sampler: it holds the model as ``transformer`` and a scheduler read only for its noise
    levels (1000 timesteps), so relcache finds it driving the model like a pipeline."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer, self.scheduler = transformer, DDIMScheduler()

    def __call__(self, steps: int) -> None:
        x, y = dit_inputs()
        run_loop(self.transformer, x, y, steps=steps)  # announces ``steps`` first, as the README says


def test_begin_generation_wins_over_the_scheduler_of_a_sampler_found_driving_the_model(dit):
    """Guards ``check_caller`` keeping an unspent ``begin_generation`` announcement (mutant: the scheduler's count
    always). The first call of a sampler class found on the stack started a generation of its scheduler's 1000
    timesteps, so RFC(target_nfc=4) computed its 2 warm-up steps of 6 (found by review); the second call already
    kept the announcement."""
    sampler = _Sampler(dit)
    with relcache.cached(dit, RFC(target_nfc=4)), warnings.catch_warnings():
        warnings.simplefilter("error")  # 6 steps as announced: nothing to warn
        for _ in range(2):
            sampler(6)
            st = relcache.stats(dit)
            assert st.num_steps == 6 and st.nfc == 4


def test_begin_generation_wins_over_a_watched_scheduler_set_by_the_loop_but_not_over_a_pipeline_call():
    """Guards ``_new_schedule`` keeping an unspent ``begin_generation`` count against the enabled pipeline's own
    scheduler set by a hand-written loop (mutants: the scheduler's count always; never, where the pipeline's call
    then ran a 3-step generation under the loop's plan of 6). The loop sets 50 timesteps to run 6 of them
    (img2img-like): RFC(target_nfc=4) had planned for 50 and computed 2 of the 6 steps fully, with no warning until
    the next start (found by review)."""
    pipe = dit_pipe()
    x, y = dit_inputs()
    with relcache.cached(pipe, RFC(target_nfc=4)), warnings.catch_warnings():
        warnings.simplefilter("error")  # each generation runs the steps it announced: nothing to warn
        relcache.begin_generation(pipe.transformer, 6)
        pipe.scheduler.set_timesteps(50)
        run_loop(pipe.transformer, x, y, steps=6, begin=False)
        st = relcache.stats(pipe)
        assert (st.num_steps, st.nfc) == (6, 4)
        relcache.begin_generation(pipe.transformer, 6)  # then a pipeline call: its scheduler's 5 steps
        pipe([1, 7], num_inference_steps=5, output_type="latent")
        st = relcache.stats(pipe)
        assert (st.num_steps, st.nfc) == (5, 4)


def test_a_repeated_cache_context_step_index_starts_a_new_generation(dit):
    """Guards ``starts_new``'s ``step_index <= step`` (mutant: ``<``). A one-step loop run twice under
    diffusers' cache context (what ``CacheMixin.cache_context("cond", step_index=0)`` sets; DiT has no CacheMixin):
    the second call's index does not advance past the context's 0, so it is a new generation with full steps [0]
    (the mutant continued the first: full steps [0, 0])."""
    x, y = dit_inputs()
    with relcache.cached(dit, FORA(3)), torch.no_grad():
        for _ in range(2):
            _set_cache_context(dit, CacheContext("cond", step_index=0))
            try:
                dit(x, timestep=torch.full((2,), 999), class_labels=y)
            finally:
                _set_cache_context(dit, None)
        st = relcache.stats(dit)
    assert st.num_steps == 1 and st.full_steps == [0]


def test_an_equal_timestep_does_not_start_a_generation(dit):
    """Guards the timestep rule's strict ``>`` (mutant: ``>=``). A bare loop, announced by nothing, whose timestep
    stays at 999 for two steps before falling is one generation of 5 steps (FORA(2): full at 0, 1, 3)."""
    x, y = dit_inputs()
    with relcache.cached(dit, FORA(2)):
        run_loop(dit, x, y, steps=5, begin=False, timesteps=[999, 999, 800, 600, 400])
        st = relcache.stats(dit)
    assert st.num_steps == 5 and st.full_steps == [0, 1, 3]


class _Wrapper(nn.Module):
    """A user's nn.Module holding the transformer as ``transformer`` (not a pipeline), in its instance dict rather
    than as a submodule (so that the wrapper's ``parameters()`` and ``state_dict()`` leave it out)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.__dict__["transformer"] = transformer

    def forward(self, x: torch.Tensor, t: int, y: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, timestep=torch.full((x.shape[0],), t), class_labels=y).sample


def test_an_nn_module_holding_the_transformer_is_not_taken_for_a_pipeline(dit):
    """Guards ``_drives`` refusing nn.Modules (mutant: a wrapper module taken for a pipeline, which marked a
    generation at its first call, so that the timestep rule no longer told the second loop from the first: one
    generation of 8 steps). Two 4-step loops through the wrapper are two generations of 4 steps (FORA(3): full at
    0, 1)."""
    x, y = dit_inputs()
    wrapper = _Wrapper(dit)
    with relcache.cached(dit, FORA(3)), torch.no_grad():
        for _ in range(2):
            for t in (999, 750, 500, 250):
                wrapper(x, t, y)
        st = relcache.stats(dit)
    assert st.num_steps == 4 and st.full_steps == [0, 1]


def test_a_compiled_wrapper_held_by_a_pipeline_is_seen_driving_the_model(dit):
    """Guards ``_unwrap`` (mutant: a ``torch.compile`` wrapper, ``_orig_mod``, not looked through): the frame of a
    pipeline whose ``transformer`` is the compiled wrapper is found as the caller."""
    wrapper = nn.Module()
    wrapper._orig_mod = dit  # what torch.compile's OptimizedModule holds

    class Pipe:
        def __init__(self) -> None:
            self.transformer = wrapper

        def __call__(self) -> object:
            return calling_pipeline(dit)

    pipe = Pipe()
    found = pipe()
    assert found is not None and found[0] is pipe


# -- pipelines and their schedulers ---------------------------------------------------------------
def test_enable_on_a_pipeline_found_driving_the_model_holds_it_and_refuses_a_second_enable():
    """Guards ``watch(explicit=True)`` on a pipeline already watched weakly (mutant: it stayed weak). B, found
    driving A's transformer, is then given to ``enable`` (attached): a second ``enable`` of B is refused, and
    ``disable(B)`` turns caching off."""
    a = dit_pipe()
    cfg = FORA(3)
    relcache.enable(a, cfg)
    try:
        b = _second(a)
        b([1, 2], num_inference_steps=3, output_type="latent")  # found driving the model: watched weakly
        relcache.enable(b, cfg)  # attached
        with pytest.raises(relcache.AlreadyEnabledError):
            relcache.enable(b, cfg)
    finally:
        relcache.disable(a)
    assert not relcache.is_enabled(a)


@pytest.mark.parametrize("how", ["cached block", "scheduler swap"])
def test_a_shared_scheduler_keeps_announcing_for_the_pipeline_still_using_it(how):
    """Guards ``unwatch_pipeline`` and ``_check_swap`` keeping a scheduler patched while another watched pipeline
    uses it (mutants: unpatched anyway). A and B share one scheduler; B leaves (its ``cached`` block ends, or it gets
    a scheduler of its own). A's next call of 6 steps must still be announced as 6 (the mutants kept A's earlier 8:
    RFC(target_nfc=3) planned for 8 and warned "announced 8 ... ran 6")."""
    a = dit_pipe()
    cfg = RFC(target_nfc=3)
    with relcache.cached(a, cfg):
        a([1, 2], num_inference_steps=8, output_type="latent")
        b = _second(a, scheduler=a.scheduler)
        if how == "cached block":
            with relcache.cached(b, cfg):
                b([1, 2], num_inference_steps=8, output_type="latent")
        else:
            b([1, 2], num_inference_steps=8, output_type="latent")  # found: watched, the scheduler shared
            b.scheduler = DDIMScheduler.from_config(a.scheduler.config)
            b([1, 2], num_inference_steps=8, output_type="latent")  # the swap is noticed here
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a([1, 2], num_inference_steps=6, output_type="latent")
        st = relcache.stats(a)
    assert st.num_steps == 6 and st.nfc == 3


@pytest.mark.parametrize("config", [relcache.RFC(target_nfc=4), relcache.FasterCache(warmup=2)],
                         ids=["target_nfc", "CFG-Cache"])
def test_a_warm_up_call_outside_the_enabled_pipeline_is_refused_with_advice_that_fits(config):
    """A direct ``pipe.transformer(...)`` call (a warm-up) on a pipeline enabled with a schedule that needs the step
    count was refused with "enable caching on the pipeline", which the user had done (found by review). The refusal
    now says the call came from outside the pipeline's calls; a call from a hand-written loop on a bare transformer
    keeps the plain advice."""
    pipe = dit_pipe()
    x, y = dit_inputs()[0][:1].repeat(2, 1, 1, 1), torch.tensor([3, 1000])  # a CFG batch, as the pipeline's
    with relcache.cached(pipe, config), torch.no_grad():
        with pytest.raises(relcache.ConfigError, match="needs the number of steps.*came from outside the enabled "
                                                       "pipeline's calls .a warm-up call of pipe.transformer"):
            pipe.transformer(x, timestep=torch.full((2,), 999), class_labels=y)
        pipe([1, 7], num_inference_steps=6, output_type="latent")  # the pipeline itself runs
    with relcache.cached(pipe.transformer, config), torch.no_grad():
        with pytest.raises(relcache.ConfigError, match="needs the number of steps") as raised:
            pipe.transformer(x, timestep=torch.full((2,), 999), class_labels=y)
        assert "came from outside" not in str(raised.value)
