"""tune(): the run's top-level loop. It starts the worker processes (Fleet), opens the results store and Optuna's
storage, reads the device in a worker, and tunes each problem in turn (Search), the next problem's search starting
while the last one's finalists are re-timed in the background. Then, with TPE, the exchange pass: each problem times
the winners of its nearest buckets that it has not (exchange).
"""
from __future__ import annotations

import contextlib
import sys
import warnings

from ..registry import kernel_identity, kernel_module
from ..shapes import Problem
from .confirm import ProblemResult
from .enqueue import exchange_configs
from .options import TuneOptions
from .pool import Fleet, require_gpu
from .progress import Progress
from .search import Search
from .startup import interpreting
from .study import check_storage, describe_storage, open_storage, quiet_optuna
from . import timing, trace


def tune(problems: list[Problem], options: TuneOptions, *, results: list[ProblemResult] | None = None,
         err=None, fleet: Fleet | None = None) -> list[ProblemResult]:
    """Tunes each problem in turn and returns (and appends to ``results``, as they finish) one result per problem.
    ``fleet``: worker processes already started (and left running) by the caller, for experiments that tune the same
    problems many times (bench/search_efficiency.py); by default the run starts and stops its own."""
    options.validate()
    preflight(options)
    err = err or sys.stderr
    results = [] if results is None else results
    first, lent = len(results), fleet is not None
    # An own fleet's workers start first: they import torch and triton while this process does the same and opens
    # its databases (this process has not imported torch yet where CUDA_VISIBLE_DEVICES names the GPUs).
    with interpreting(options.interpret), contextlib.nullcontext(fleet) if lent else Fleet(options).starting() as fleet:
        if not options.interpret:
            require_gpu()
        trace.event("gpu_checked")
        from ..store import Store
        with Store(options.db) as store, warnings.catch_warnings(), contextlib.ExitStack() as stack:
            quiet_optuna()
            storage = open_storage(options.storage, store.url, options.heartbeat_s, options.grace_s)
            print(f"tunebench tune: results in {store.where}, studies in {describe_storage(storage)}", file=err)
            trace.event("tune", workers=options.workers, problems=len(problems))
            for kernel in dict.fromkeys(p.kernel for p in problems):
                kernel_module(kernel)  # and triton: imported while the workers start, not once they are ready
            trace.event("kernels_imported")
            stack.enter_context(frozen_heap())
            fleet.await_ready()
            trace.event("fleet_ready", runners=len(fleet.runners), compilers=len(fleet.compilers))
            device = fleet.identify()
            trace.event("identified")
            try:
                order = schedule(problems)
                for index, problem in enumerate(order):
                    trace.event("problem", index=index, label=problem.label())
                    search = Search(problem, options, store, storage, fleet, device,
                                    Progress(err, index, len(problems), problem))
                    # Its result arrives once its finalists are re-timed: in the background of the next search.
                    search.tune(results.append, last=index == len(problems) - 1)
                fleet.drain()
                if options.exchange and options.sampler == "tpe":
                    exchange(order, options, store, storage, fleet, device, results, first, err)
            except BaseException:
                fleet.abandon_tails()  # trials still finishing in the background: a later run runs them
                if lent:  # a caller's fleet must not hold replies meant for this run (an own fleet is closed now)
                    fleet.cancel_background()
                raise
            finally:
                order = {id(p): i for i, p in enumerate(problems)}
                results[first:] = sorted(results[first:], key=lambda r: order.get(id(r.problem), len(problems)))
    trace.event("fleet_closed")
    return results


def exchange(order: list[Problem], options: TuneOptions, store, storage, fleet: Fleet, device,
             results: list[ProblemResult], first: int, err) -> None:
    """The exchange pass, once every problem is tuned: each problem evaluates the winners of its nearest buckets that
    it has not (enqueue.exchange_configs), so that what a bucket tuned late found reaches those tuned before it. A
    problem's new result (its study's, re-timed with the new configs among the finalists) replaces its entry in
    ``results`` (this run's, from index ``first``). One round: the configs are chosen from the winners as the main
    pass left them."""
    todo = []
    for problem in order:
        module = kernel_module(problem.kernel)
        configs = exchange_configs(store, device, problem, kernel_identity(problem.kernel), module.DEFAULT,
                                   lambda config, module=module, problem=problem: module.keep(config, problem))
        if configs:
            todo.append((problem, configs))
    if not todo:
        return
    print(f"exchange: {len(todo)} of {len(order)} problems time their neighbours' winners", file=err)
    trace.event("exchange", problems=len(todo))
    for index, (problem, configs) in enumerate(todo):
        search = Search(problem, options, store, storage, fleet, device,
                        Progress(err, index, len(todo), problem, stage="exchange"), exchange=configs)

        def replace(result: ProblemResult, problem=problem) -> None:
            for i in range(first, len(results)):
                if results[i].problem is problem:
                    results[i] = result

        search.tune(replace, last=index == len(todo) - 1)
    fleet.drain()


@contextlib.contextmanager
def frozen_heap():
    """The objects that exist now (torch, triton, optuna and the kernels: ~175,000 of them) are left out of the
    garbage collector's passes until the block ends (gc.freeze). Otherwise a full pass over them, which the
    allocations of Optuna and the store trigger every few hundred trials, stalls the loop that feeds every worker:
    120-220 ms in a 0.3-0.8 s search window of bench/fleet_sim.py (8 workers, 20 ms trials, 2 cores). The objects made
    in the block are collected as usual. Left frozen if the caller had frozen objects itself."""
    import gc
    before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not before:
            gc.unfreeze()


def preflight(options: TuneOptions) -> None:
    """Every check of where the run will write, made before anything is written or a worker started: the results
    database (an SQLite file inspected read-only: writable, tunebench's, not newer; store.engine.check_writable) and
    Optuna's storage (its URL, a writable file or a server that answers; study.check_storage)."""
    from ..store import resolve_url
    from ..store.engine import check_writable
    results_url = resolve_url(options.db)
    check_writable(results_url)
    check_storage(options.storage, results_url)


def schedule(problems: list[Problem]) -> list[Problem]:
    """The order the problems are tuned in: those whose timings take longest first (timing.typical_s), else as given
    (the results come back in the given order). Each problem's finalists are re-timed in the background of the next
    problem's search, but nothing overlaps the last problem's re-timing, so that one should be short: a paged decode
    problem's (graph replays) can hold every GPU for several seconds, where a flash problem's takes about one."""
    return sorted(problems, key=lambda p: -timing.typical_s(p.paged))
