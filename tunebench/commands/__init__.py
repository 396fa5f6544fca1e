"""One small module per CLI command: each `*_command(args)` takes the parsed arguments, calls the library, prints, and
returns an exit code. tunebench/cli.py only parses and calls them.

Exit codes, the same for every command (a user's CI keys on them):
"""
OK = 0              # done; for check and tune: every case passed, every problem has a winner
FAILED = 1          # ran, and found a failure: a check case wrong, a tune problem without a winner, bench cut short
USAGE = 2           # bad usage or bad input (argparse, a value out of range, an unknown name, a missing file or
#                     package): nothing was checked or tuned
INTERNAL = 3        # tunebench itself crashed (a bug: the traceback is printed)
INTERRUPTED = 130   # Ctrl-C

EXIT_CODES_HELP = """exit codes:
  0    ok (check: every case passed; tune: every problem has a winner)
  1    a failure was found (check: a case is wrong; tune: a problem has no winner; bench: cut short)
  2    bad usage or bad input (arguments, values, names, files, a missing package); nothing was run
  3    tunebench itself crashed (a bug: the traceback is printed)
  130  interrupted"""
