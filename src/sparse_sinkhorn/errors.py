"""The library's error types: every error the library defines derives from
[`SparseSinkhornError`][sparse_sinkhorn.errors.SparseSinkhornError] (and, where it has one, from
the built-in type it refines, so ``except ValueError`` keeps working).

* [`UsageError`][sparse_sinkhorn.errors.UsageError]: a bad flag value, a flag combination that
  cannot work, or an
  ``--out`` that does not fit the request; the ``sparse-sinkhorn`` command prints it as one
  line (``sparse-sinkhorn: error: ...``) and exits with status 2, as for an argparse error.
* the others (a locked run directory, a bad checkpoint, a config that does not match a
  checkpoint, a missing dataset, a failed download, a non-finite loss, a dead worker) live
  beside the code that raises them; the command prints any
  [`SparseSinkhornError`][sparse_sinkhorn.errors.SparseSinkhornError] as one line.

Errors about a function's arguments (shapes, dtypes, option values) are plain
``ValueError``/``TypeError``, as in PyTorch.
"""

from __future__ import annotations


class SparseSinkhornError(Exception):
    """Base class of every error type this library defines."""


class UsageError(SparseSinkhornError):
    """The command's input cannot work: the message says which flag and why."""
