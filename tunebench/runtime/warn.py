"""Run-time warnings that point at the user's line: `warnings` names the first frame outside tunebench (and torch,
through which a torch.compile'd call arrives), however deep the dispatch path that raised it is."""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # .../tunebench


def _internal(filename: str) -> bool:
    torch = sys.modules.get("torch")
    torch_dir = os.path.dirname(torch.__file__) if torch is not None and getattr(torch, "__file__", None) else None
    return filename.startswith(_PACKAGE + os.sep) or (torch_dir is not None and filename.startswith(torch_dir + os.sep))


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message) with the stacklevel of the caller's first frame outside tunebench and torch."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)     # +1: this function's own frame
