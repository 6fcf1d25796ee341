"""Keywords accepted under a former name (`renamed_keywords`), so that code written for it
keeps working, with a ``DeprecationWarning`` naming the current name.

Passing a keyword under both names is a ``TypeError``, as for any keyword given twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any


def renamed_keywords(
    kwargs: Mapping[str, Any],
    renames: Mapping[str, str],
    where: str,
    *,
    strict: bool = False,
    stacklevel: int = 3,
) -> dict[str, Any]:
    """``kwargs`` with each former name of ``renames`` (``{former: current}``) replaced by its
    current name, warning once per former name passed.

    Args:
        kwargs: keyword arguments as the caller received them.
        renames: former name -> current name.
        where: what took them (``"LanguageModel.generate"``), for the messages.
        strict: ``kwargs`` hold only former names (a function's ``**former``): any other
            keyword is a ``TypeError``, as Python raises for an unexpected keyword.
        stacklevel: of the warning; the default points at the caller of ``where``.
    """
    if strict:
        unknown = sorted(set(kwargs) - set(renames))
        if unknown:
            raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    out = dict(kwargs)
    for former, current in renames.items():
        if former not in out:
            continue
        if current in out:
            raise TypeError(f"{where}: pass {current}= only ({former}= is its former name)")
        warnings.warn(
            f"{where}: {former}= is renamed {current}=; the former name will be removed",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        out[current] = out.pop(former)
    return out


__all__ = ["renamed_keywords"]
