"""The Gradio side-by-side demo of diffaccel: ``python demo/app.py`` (or ``diffaccel demo``).

``build_app(...)`` returns the ``gr.Blocks`` (see :func:`diffaccel.demo.ui.build_app`); the logic lives in the
importable package :mod:`diffaccel.demo`, this file is only the entry point the design card names.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from diffaccel.demo.ui import build_app  # noqa: E402

__all__ = ["build_app"]

if __name__ == "__main__":
    from diffaccel.cli import main

    sys.argv = ["diffaccel", "demo", *sys.argv[1:]]
    main()
