"""`tunebench bench`: the tuned kernels against their peers, on one GPU, in one process.

For each problem every provider gets the same inputs (tunebench.inputs). Each provider runs once, and its output is
checked against the same float64 reference rows with the project's one rule (tunebench.correctness.close_enough);
only then are the correct ones timed. A provider that disagrees is reported as wrong and not timed; one that cannot
run is reported with its reason; the rest go on. The copy bandwidth and the matmul rate are measured in the same run,
so "% of ceiling" compares like with like.

- providers: tunebench's kernels and the peers (SDPA backends, FlexAttention, FlashInfer, flash-attn, ...);
- measure: timers (decode by CUDA-graph replay, with launch by launch beside it), run_problem, the measured ceilings;
- ragged: a decode batch of mixed sequence lengths (seeded), its inputs and its reference;
- tables: rows, tables, the summary, CSV/JSON/Markdown: pure functions of measurements, testable on synthetic
  numbers;
- plots: throughput and roofline PNGs (matplotlib, optional).
The command itself is tunebench.commands.bench.
"""
