"""A worker process's end of the pipe: the request loop that the real worker (tunebench.tune.worker) and a simulated
one (tunebench.tune.simulate) share. It imports nothing heavy, so a simulated worker starts without torch."""
from __future__ import annotations

import os
from typing import Callable


def serve_requests(conn, handle: Callable[[object], tuple[tuple, bool]]) -> None:
    """Answers the parent's requests until it closes its end or sends None (exit). ``handle(request)`` returns
    (reply, fatal): reply is ("ok", value) or ("error", message); fatal when this process cannot go on (its CUDA
    context is unusable): it replies, then exits, and the parent starts a fresh one."""
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            # Asked to exit: nothing is left to write, so skip the interpreter's teardown (slow with torch and a CUDA
            # context loaded); the driver frees the GPU as the process ends.
            conn.close()
            os._exit(0)
        reply_, fatal = handle(request)
        if not reply(conn, (*reply_, fatal)):
            return
        if fatal:
            conn.close()
            os._exit(3)


def reply(conn, message) -> bool:
    """Sends to the parent; False when the parent is gone (killed, or closed its end), and the worker should exit
    quietly rather than print a BrokenPipeError."""
    try:
        conn.send(message)
        return True
    except OSError:  # BrokenPipeError, ConnectionResetError: the other end is closed
        return False
