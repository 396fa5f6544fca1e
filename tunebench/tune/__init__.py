"""`tunebench tune`: an Optuna search per problem, over configs compiled, checked and timed in worker processes.

The modules, in the order data flows through them:
- protocol: the requests the parent sends a worker process and what comes back (both sides import it);
- worker: in the worker process, compile -> check -> time (timing: how a launch is timed; serving: its request loop);
- pool: the parent's handles on the workers (Worker) and the run's set of them (Fleet); startup: how a worker
  process starts (forked from a forkserver that imported torch and triton once, or spawned) and its environment;
- study: Optuna's storage, studies and samplers; SPACE becomes suggestions in exactly one place;
- shared: one problem's study as every process sharing it sees it (SharedStudy), and the trial records;
- enqueue: DEFAULT and the grid in Optuna's queue; search: one problem's search loop (Search);
- confirm: the finalists re-timed against each other, the winner upserted; progress: what the run shows;
- run: tune(), the loop over the problems. trace: a timeline of the run ($TUNEBENCH_TRACE=FILE,
  bench/trace_summary.py reads it). simulate: workers that sleep instead of running a trial, for measuring how many
  GPUs the parent's loop keeps busy (bench/fleet_sim.py).

A stopped run resumes: a study's finished trials (evaluated or pruned) are never run again and count toward
--trials; trials a killed run left RUNNING are failed and queued again once (study.retry_once). --workers N runs one
runner process per GPU (CUDA_VISIBLE_DEVICES pinned per runner; under --interpret, N CPU runners), fed by this
process's one loop; processes on several hosts share studies through a --storage URL.

Nothing is re-exported here: importing a worker module must not import the parent's side.
"""
