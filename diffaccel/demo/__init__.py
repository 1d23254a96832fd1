"""The Gradio side-by-side demo (issue 15): dense versus a method, or two methods, on one prompt and seed.

- :mod:`diffaccel.demo.compare`: the engine (pipeline LRU, side reuse, interleaved timing, fidelity, masks);
- :mod:`diffaccel.demo.params`: parameter widgets generated from the methods' config dataclasses;
- :mod:`diffaccel.demo.visuals`: heat map, mask picture, synchronized side-by-side clip;
- :mod:`diffaccel.demo.ui`: the ``gr.Blocks`` page and its handlers (imports gradio: ``pip install diffaccel[demo]``);
- :mod:`diffaccel.demo.command`: ``diffaccel demo`` (imports nothing heavy until it runs).

Importing this package imports none of them, so ``diffaccel --help`` stays light.
"""
