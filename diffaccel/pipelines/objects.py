"""Pickling a method with its processor (``torch.save`` of a whole model): per-run caches are dropped, not lost
silently.

Methods cache plans per layer (block masks, token orders, element masks as local ``mask_mod`` closures, which
cannot be pickled). A cache is derived state: :func:`picklable_method` pickles the method as is when it can, and
otherwise with every unpicklable cache (a private ``dict``/``list``/``set`` attribute) emptied, so it is rebuilt on
the first call after loading; one warning names the caches. Anything else that cannot be pickled is an error that
names the attribute.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

from diffaccel.warn import warn_once


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - any pickling failure means "not picklable"
        return False
    return True


def picklable_method(method: Any) -> Any:
    """``method`` itself if it pickles, else a shallow copy whose unpicklable private caches are emptied."""
    if _picklable(method):
        return method
    clone = copy.copy(method)
    emptied = []
    for name, value in list(vars(method).items()):
        if _picklable(value):
            continue
        if name.startswith("_") and isinstance(value, (dict, list, set)):
            setattr(clone, name, type(value)())
            emptied.append(name)
        else:
            raise TypeError(
                f"cannot pickle method {type(method).__name__}: its attribute {name!r} ({type(value).__name__}) is "
                "not picklable"
            )
    warn_once(
        f"pickle-caches:{type(method).__name__}",
        f"diffaccel: {type(method).__name__} is saved without its per-run caches ({', '.join(emptied)}); they are "
        "rebuilt on the first call after loading",
    )
    return clone
