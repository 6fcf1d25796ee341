"""Typed errors about how a command was called.

:class:`UsageError` is a bad flag value, a flag combination that cannot work, or an ``--out``
that does not fit the request. The library raises it like any exception; the
``sparse-sinkhorn`` command prints it as one line (``sparse-sinkhorn: error: ...``) and exits
with status 2, as it does for an argparse error.
"""

from __future__ import annotations


class UsageError(Exception):
    """The command's input cannot work: the message says which flag and why."""
