"""``diffaccel calibrate``: offline calibration of static-plan methods (PARO), from dense generations.

Importing this package imports nothing heavy (``diffaccel --help`` stays fast): the command lives in
:mod:`.command`, the driver in :mod:`.driver`, the summary table and heatmap in :mod:`.report`.
"""
