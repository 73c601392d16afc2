"""``cached_njit``: numba's ``njit`` with the on-disk cache where one can be written.

Every numba kernel of maddnet is compiled through it, so that a fresh process reuses what an
earlier one compiled (``cache=True``: next to the source in ``__pycache__``, else in numba's
user cache folder; ``NUMBA_CACHE_DIR`` sets another) and so that a read-only install with
no writable home still imports: there numba raises RuntimeError ("no locator available") at
decoration, and the kernel is compiled in memory once per process instead.

This module imports only numba (no maddnet modules), so a kernel file and it can be copied
and imported on their own (the cache tests do that).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba

__all__ = ["cached_njit"]


def cached_njit(**options: Any) -> Callable[[Callable], Callable]:
    """Decorator: ``numba.njit(cache=True, nogil=True, **options)``, or the same without
    ``cache`` where numba finds no writable cache folder."""

    def wrap(func: Callable) -> Callable:
        try:
            return numba.njit(cache=True, nogil=True, **options)(func)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, **options)(func)

    return wrap
