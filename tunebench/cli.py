"""The `tunebench` command. It only parses arguments and calls library functions (tunebench/commands/)."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from .commands import EXIT_CODES_HELP, INTERNAL, INTERRUPTED, USAGE
from .registry import known_kernels
from .roofline import GPUS as ROOFLINE_GPUS

JSON_HELP = "print one JSON document on stdout instead of the text (the text's progress goes to stderr)"


def _check(args) -> int:
    from .commands.check import check_command
    return check_command(args)


def _tune(args) -> int:
    from .commands.tune import tune_command
    return tune_command(args)


def _show(args) -> int:
    from .commands.show import show_command
    return show_command(args)


def _kv_size(args) -> int:
    from .commands.kv_size import kv_size_command
    return kv_size_command(args)


def _pages(args) -> int:
    from .commands.pages import pages_command
    return pages_command(args)


def _roofline(args) -> int:
    from .commands.roofline import roofline_command
    return roofline_command(args)


def _bench(args) -> int:
    from .commands.bench import bench_command
    return bench_command(args)


def _report(args) -> int:
    from .commands.report import report_command
    return report_command(args)


def versions() -> str:
    """'tunebench 0.1.0 (torch 2.13.0, triton 3.6.0, Python 3.11.9)', read from the installed packages' metadata
    without importing torch or triton."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    return (f"tunebench {__version__} (torch {installed('torch')}, triton {installed('triton')}, "
            f"Python {sys.version.split()[0]})")


class _Version(argparse.Action):
    """--version, read only when asked for (metadata look-ups cost a few ms on every other call)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph text (descriptions) and keeps text laid out in lines (the epilogs) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parsers:
    """Makes each command's parser with the exit codes as its epilog, kept as written."""

    def __init__(self, sub):
        self.sub = sub

    def add(self, name: str, *, help: str, description: str | None = None, epilog: str = ""):
        return self.sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".",
                                   epilog=(epilog + "\n\n" if epilog else "") + EXIT_CODES_HELP,
                                   formatter_class=_Formatter)


CHECK_EPILOG = """in CI (the exact line to copy; see README "In your CI"):
  tunebench check --profile cpu --junit check.xml        # CPU runner: the Triton interpreter
  tunebench check --profile gpu --json > check.json      # GPU runner

--json prints {"tunebench", "command": "check", "device", "profile", "ok",
  "kernels": [{"kernel", "examples", "configs", "worst_ratio", "ok", "failures": [{"repro", "reason"}]}]};
  with --shape/--config: {"tunebench", "command", "device", "ok", "replay": {"kernel", "problem", "config",
  "seed", "layout", "ok", "err", "allowed", "reason"}}.
--junit FILE writes JUnit XML: one <testsuite> per kernel, one <testcase> per example (the failing ones hold
  the reason and the `tunebench check ...` line that replays them)."""

TUNE_EPILOG = """--json prints the end-of-run summary as {"tunebench", "command": "tune", "wall_s", "interpret",
  "problems": [{"problem", "bucket", "config", "median_ms", "default_ms", "speedup", "counts", "wall_s",
  "written", "note", "speedup_vs_peer"}], "missing": N}; progress goes to stderr either way."""

SHOW_EPILOG = """--json prints {"tunebench", "command": "show", "db", "winners": [{"device", "capability", "torch",
  "triton", "speed_measurement", "kernel", "source_hash", "bucket", "problem", "config", "median_ms",
  "speedup_vs_default", "speedup_vs_peer", "updated_at"}]}."""

REPORT_EPILOG = """--json prints {"tunebench", "command": "report", "db", "winners": [show's fields and "trials",
  "tuning_span_s", "tuning_busy_s", "stale", "vs_runner_up"], "trial_totals": {status: count}}."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunebench",
        description="Tune, check and run Triton attention kernels (FlashAttention V1/V2, paged decode).",
        epilog="`tunebench COMMAND --help` explains each command.\n\n" + EXIT_CODES_HELP,
        formatter_class=_Formatter)
    p.add_argument("--version", action=_Version, help="print the versions of tunebench, torch and triton, and exit")
    sub = _Parsers(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    kernels = sorted(known_kernels())
    kernel_module_help = ("register a kernel module of your own, [NAME=]pkg.mod (NAME defaults to its last part), "
                          "importable from here; it must follow the convention of tunebench.kernel_protocol "
                          "(repeatable)")

    c = sub.add("check", help="run the correctness gate (Hypothesis shapes and configs vs float64 reference)",
                description="Draws shapes and configs with Hypothesis and checks every kernel against the float64 "
                            "reference. Uses the GPU when there is one, else the Triton interpreter.",
                epilog=CHECK_EPILOG)
    c.add_argument("--kernel", action="append", metavar="KERNEL",
                   help=f"kernel to check (repeatable; default all): {', '.join(kernels)}, or one of --kernel-module")
    c.add_argument("--kernel-module", action="append", metavar="[NAME=]MODULE", help=kernel_module_help)
    c.add_argument("--profile", choices=("cpu", "gpu"), default=None,
                   help="cpu: small fp16/fp32 shapes for the interpreter; gpu: up to 16k tokens, D 256, bf16 too "
                        "(default: gpu when CUDA is available)")
    c.add_argument("--examples", type=int, default=None, help="Hypothesis examples per kernel (default: profile's)")
    c.add_argument("--shape", help="replay one case: the problem as JSON (as a failing run prints it)")
    c.add_argument("--config", help="replay one case: the config as JSON")
    c.add_argument("--seed", type=int, default=0, help="input seed for --shape/--config")
    c.add_argument("--layout", choices=("bhnd", "bnhd"), default="bhnd",
                   help="bnhd: [B,N,H,D] storage viewed through .transpose(1, 2)")
    c.add_argument("--json", action="store_true", help=JSON_HELP)
    c.add_argument("--junit", metavar="FILE", default=None,
                   help="also write the cases as JUnit XML to FILE (for CI test reports)")
    c.set_defaults(func=_check)

    t = sub.add("tune", help="search tile sizes, warps and stages with Optuna; store the winners",
                description="Tunes every problem of a suite (or preset, or recording) on this GPU: each candidate "
                            "config is compiled, checked against the reference and timed in an isolated worker "
                            "process.",
                epilog=TUNE_EPILOG)
    t.add_argument("--kernel", action="append", metavar="KERNEL",
                   help=f"only these kernels (repeatable): {', '.join(kernels)}, or one of --kernel-module; a "
                        f"kernel of your own tunes the problems its SHAPES declares for the suite. Default: every "
                        f"kernel that runs here; on Hopper flash_v3 takes each flash_v2 bucket it can run too, so "
                        f"that variant='auto' compares the two")
    t.add_argument("--kernel-module", action="append", metavar="[NAME=]MODULE", help=kernel_module_help)
    t.add_argument("--suite", default=None, help="named suite of problems (default: 'default'; 'tiny' for the CPU)")
    t.add_argument("--preset", default=None, help="model preset, e.g. llama-3-8b (instead of --suite)")
    t.add_argument("--from-record", default=None, metavar="FILE",
                   help="tune the buckets a program hit, most-called first: a file written by tunebench.record() or "
                        "TUNEBENCH_RECORD (instead of --suite)")
    t.add_argument("--dtype", action="append", choices=("float16", "bfloat16", "float32"),
                   help="only problems of these dtypes (repeatable), e.g. to split a suite across runs")
    t.add_argument("--trials", type=int, default=None,
                   help="configs evaluated per problem; pruned and repeated configs do not count "
                        "(default: 24, or the grid size); with tpe the exchange pass may add up to 3 (--no-exchange)")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds a trial may take before it is killed")
    t.add_argument("--sampler", choices=("tpe", "grid"), default="tpe", help="tpe (seeded) or exhaustive grid")
    t.add_argument("--seed", type=int, default=0, help="sampler and input seed")
    t.add_argument("--db", default=None, help="results database URL or path (default: the per-user database)")
    t.add_argument("--storage", default=None,
                   help="Optuna storage for studies: a database URL, a journal file PATH.journal, or "
                        "journal:POSTGRESQL_URL (Optuna's journal in a table: for hosts sharing studies, ~5x fewer "
                        "parent ms per trial than Optuna's tables) (default: a journal beside --db)")
    t.add_argument("--workers", type=int, default=1, help="GPUs of this host to tune on at once")
    t.add_argument("--compile-workers", type=int, default=None,
                   help="CPU processes compiling configs ahead of the GPUs (default: one per spare core, up to 8 "
                        "per --workers; 0: off)")
    t.add_argument("--interpret", action="store_true",
                   help="run the whole pipeline on the CPU under the Triton interpreter (not a speed measurement)")
    t.add_argument("--replace", action="store_true",
                   help="store this run's winners even where the database holds a faster one for the bucket (by "
                        "default a winner is replaced only by a faster time; times from another run, or one "
                        "timed while the machine was busy, may not compare)")
    t.add_argument("--no-exchange", action="store_true",
                   help="tpe: skip the exchange pass, in which, once every problem is tuned, each times the winners "
                        "of its nearest buckets it has not evaluated (up to 3 configs; the problems are tuned in "
                        "turn, so one tuned early otherwise never tries what its later neighbours found)")
    t.add_argument("--json", action="store_true", help=JSON_HELP)
    t.set_defaults(func=_tune)

    s = sub.add("show", help="list the stored winners", epilog=SHOW_EPILOG)
    s.add_argument("--db", default=None, help="results database URL or path (default: the per-user database)")
    s.add_argument("--kernel", choices=kernels, default=None, help="only this kernel")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=_show)

    k = sub.add("kv-size", help="KV cache bytes per token, per batch, and blocks that fit in memory",
                description="bytes/token = 2 x layers x kv heads x head dim x dtype size")
    k.add_argument("--layers", type=int, required=True)
    k.add_argument("--kv-heads", type=int, required=True)
    k.add_argument("--head-dim", type=int, required=True)
    k.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "fp16", "bf16", "fp32"), default="float16")
    k.add_argument("--context", type=int, required=True, help="tokens per sequence")
    k.add_argument("--batch", type=int, default=1, help="sequences")
    k.add_argument("--memory", type=float, default=None, help="memory budget in GiB: how many blocks fit")
    k.add_argument("--block-size", type=int, default=16, help="tokens per block for the blocks-that-fit count")
    k.set_defaults(func=_kv_size)

    pg = sub.add("pages", help="which KV page size: predicted decode time and waste per page size",
                 description="For a preset's decode grid or a recorded workload, prints per page size with "
                             "tuned winners: the predicted decode time, the expected waste of last blocks, "
                             "the blocks for a token budget, and the page that minimises time / (1 - waste), "
                             "which BlockAllocator uses. Tune the page sizes first: tunebench tune --suite "
                             "pages.")
    pg.add_argument("--preset", default=None, help="model preset whose decode grid is the workload, e.g. llama-3-8b")
    pg.add_argument("--from-record", default=None, metavar="FILE",
                    help="a file written by tunebench.record / TUNEBENCH_RECORD: its paged buckets are the workload")
    pg.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="bfloat16",
                    help="cache dtype of a preset (a record names its own)")
    pg.add_argument("--db", default=None, help="results database (default: those the dispatcher reads)")
    pg.add_argument("--device", default=None, help="whose winners (default: this GPU), e.g. 'NVIDIA H200'")
    pg.add_argument("--tokens", type=int, default=1 << 20, help="token budget the blocks column counts pages for")
    pg.set_defaults(func=_pages)

    r = sub.add("roofline", help="FLOPs, minimum bytes, arithmetic intensity and the bound of a shape",
                description="Prints a shape's FLOPs, minimum bytes, FLOPs/byte, the GPU's ridge point, whether it is "
                            "memory- or compute-bound, and its time floor. --sweep prints the seed's table of N, d and "
                            "ops/byte next to the fused kernel's.")
    r.add_argument("--kernel", choices=kernels, default="flash_v2")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--heads", type=int, default=None, help="query heads")
    r.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    r.add_argument("--seq-q", type=int, default=None, help="query length (1 for paged decode)")
    r.add_argument("--seq-k", type=int, default=None, help="key length / context (default: --seq-q)")
    r.add_argument("--head-dim", type=int, default=None)
    r.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "fp16", "bf16", "fp32"), default="float16")
    r.add_argument("--causal", action="store_true")
    r.add_argument("--gpu", choices=sorted(ROOFLINE_GPUS), default=None,
                   help="ceilings of this GPU (default: this machine's GPU if listed, else H100)")
    r.add_argument("--ceiling", choices=("measured", "datasheet"), default="measured",
                   help="prefer ceilings measured on this workplace's GPUs, or the datasheet's")
    r.add_argument("--sweep", action="store_true", help="the seed's N x d table of ops/byte, unfused vs fused")
    r.add_argument("--suite", default=None, help="analyse every problem of a named suite")
    r.set_defaults(func=_roofline)

    b = sub.add("bench", help="tuned kernels against SDPA, FlexAttention and others, with measured ceilings",
                description="On one GPU, in one process: measures the copy bandwidth and the matmul rate, then runs "
                            "every provider on the same inputs per problem, checks their outputs against a float64 "
                            "reference, times the correct ones (do_bench median; decode by CUDA-graph replay, "
                            "with do_bench launch by launch beside it) and writes tables, CSV, JSON and plots.")
    b.add_argument("--suite", default=None, help="named suite (default: 'headline')")
    b.add_argument("--preset", default=None, help="model preset, e.g. llama-3-8b (instead of --suite)")
    b.add_argument("--out", default="bench-results", help="directory for bench.csv, bench.json, bench.md and PNG plots")
    b.add_argument("--kernel", action="append", choices=kernels,
                   help="only problems of these kernels (flash_v1/flash_v2: prefill; paged_attention: decode)")
    b.add_argument("--dtype", action="append", choices=("float16", "bfloat16", "float32"),
                   help="only problems of these dtypes (repeatable), e.g. to split a suite across runs")
    b.add_argument("--provider", action="append", default=None,
                   help="only these providers (repeatable; default all), e.g. tunebench-v2, sdpa-cudnn, flex")
    b.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds per problem (default 3): every provider once per round, the order "
                        "rotated, each figure the median of its rounds; bench.csv's round_spread is the slowest "
                        "round over the fastest")
    b.add_argument("--rep-ms", type=float, default=40.0,
                   help="do_bench repetition time per provider and round, ms (decode: also the ms of launches per "
                        "CUDA graph; default 40)")
    b.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up time per provider and round, ms")
    b.add_argument("--graph-prefill", action="store_true",
                   help="time prefill by CUDA-graph replay too, as decode is, with the launch-by-launch figure beside "
                        "it: how much of a short prefill's time is host launch cost (ratios then use the graph "
                        "figure, and graph replay does not flush L2)")
    b.set_defaults(func=_bench)

    rp = sub.add("report", help="winners, speedups over DEFAULT, trial outcomes and tuning time",
                 description="Summarises a results database: winners per problem with speedup over DEFAULT, trial "
                             "status counts, tuning time from trial timestamps, and a PNG of speedups.",
                 epilog=REPORT_EPILOG)
    rp.add_argument("--db", default=None, help="results database URL or path (default: the per-user database)")
    rp.add_argument("--out", default=None,
                    help="directory for report.md and speedups.png (default: print only; the PNG needs "
                         "`pip install 'tunebench[plots]'`)")
    rp.add_argument("--json", action="store_true", help=JSON_HELP)
    rp.set_defaults(func=_report)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs one command and returns its exit code (tunebench.commands: 0 ok, 1 a failure found, 2 bad usage or
    input, 3 a crash of tunebench itself, 130 interrupted). argparse exits with 2 itself on bad arguments."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("TUNEBENCH_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) would quote it
        print(f"tunebench {args.command}: error: {message}", file=sys.stderr)
        return USAGE
    except Exception:                                   # noqa: BLE001 - a bug: say so, with its traceback
        if os.environ.get("TUNEBENCH_DEBUG"):
            raise
        traceback.print_exc()
        print(f"tunebench {args.command}: internal error (a bug in tunebench: please report the traceback above)",
              file=sys.stderr)
        return INTERNAL


if __name__ == "__main__":
    sys.exit(main())
