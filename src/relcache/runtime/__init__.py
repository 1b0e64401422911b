"""The runtime: attaches a ``CacheConfig`` (a predictor times a schedule) to a model and runs it.

One job per file:

* ``controller``: one ``Session`` per enabled model: its hooks, contexts and stats;
* ``calls``: the start and end of each transformer call (mixed into ``Session``);
* ``modules``: per cached module at a step, "forecast, or compute and record" (mixed into ``Session``);
* ``steps``: the step's single decision and the rows of numbers its modules read (and RCS's pre-pass under compile);
* ``context``: per-context state as small named records;
* ``generations``: every rule of when a generation starts and ends;
* ``experts``: several transformers run in turn by one pipeline (Wan 2.2's experts), in one session;
* ``cfg``: CFG-Cache at call level, batched and split;
* ``accounting``: FLOP measurement;
* ``stats``: the stats (``CacheStats``, ``ContextStats``) and how contexts combine;
* ``hooks``: the hooks on diffusers' registry, attached and detached next to accelerate's;
* ``shared``: copies of one module computed once per call (DiT's per-block embeddings);
* ``distributed``: under context parallelism, token reductions summed over the group, and the step's guard.
"""

from .accounting import flop_counter
from .controller import Session
from .generations import checked_num_steps
from .stats import CacheStats, ContextStats

__all__ = ["CacheStats", "ContextStats", "Session", "checked_num_steps", "flop_counter"]
