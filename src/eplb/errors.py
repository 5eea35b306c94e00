"""eplb's exceptions: one tree under :class:`EplbError`.

Every error eplb raises because of its *input or environment* (a bad argument, a malformed file, a
layout that cannot work, ranks that disagree, a server that does not answer) is an
:class:`EplbError`; anything else is a bug and stays a traceback. The ``eplb`` command line turns
exactly these into ``eplb: error: ...`` with exit code 2.

Each class also derives from the built-in exception callers used to catch before this tree existed
(``ValueError``, ``OSError``, ``RuntimeError``, ``AssertionError``), so ``except ValueError`` keeps
working. The old names stay importable from their modules (``eplb.PlacementError``,
``eplb.formats.MapFormatError``, ``eplb.stats.trace.TraceError`` ...).

::

    EplbError
    ├── InputError (ValueError)            a bad argument or value; the message names it
    │   ├── PlacementError                 a placement / map is malformed
    │   │   ├── MapFormatError             a map file is missing, unreadable or malformed
    │   │   └── AgreementError             ranks disagree on a placement or their inputs
    │   ├── TraceError                     a trace file or array is malformed
    │   ├── ConfigError                    an online-balancer option is invalid
    │   ├── CostModelError                 a cost-model file is malformed
    │   └── EngineLayoutError (AssertionError)  an engine passed an impossible layout
    ├── EplbIOError (OSError)              a file could not be written
    ├── PullError (OSError)                a server or its dump could not be reached
    └── BalancerError (RuntimeError)       the online balancer stopped (policy failed, plans disagree)
        └── StalledRankError               a peer stopped answering a collective within its deadline
"""

from __future__ import annotations

__all__ = [
    "AgreementError", "BalancerError", "ConfigError", "CostModelError", "EngineLayoutError", "EplbError",
    "EplbIOError", "InputError", "MapFormatError", "PlacementError", "PullError", "StalledRankError", "TraceError",
]


class EplbError(Exception):
    """Base of every error eplb raises for its input or environment (not for its own bugs)."""


class InputError(EplbError, ValueError):
    """A bad argument or value; the message names it (in the caller's vocabulary) and what was expected."""


class PlacementError(InputError):
    """A placement (or a map file describing one) is malformed; the message says exactly where."""


class MapFormatError(PlacementError):
    """A map file is missing, unreadable or malformed; the message names the file and the problem."""


class AgreementError(PlacementError):
    """Ranks disagree (placement digest, shapes, sizes) or one of them reported a bad construction input;
    raised on every rank of the group."""


class TraceError(InputError):
    """A trace file or array is malformed; the message names the file and field."""


class ConfigError(InputError):
    """An online-balancer option is invalid; the message names the option as written."""


class CostModelError(InputError):
    """A cost-model file or dict is malformed; the message names the source and field."""


class EngineLayoutError(InputError, AssertionError):
    """An engine passed an impossible layout (e.g. ``num_replicas`` not a multiple of ``num_ranks``).

    Also an ``AssertionError`` because that is what vLLM's and SGLang's own policies raise for these
    inputs (their tests expect it)."""


class EplbIOError(EplbError, OSError):
    """A file or directory could not be written (or read); the message names the path."""


class PullError(EplbError, OSError):
    """Talking to a server or finding its dump failed; the message names the URL or directory."""


class BalancerError(EplbError, RuntimeError):
    """The online balancer cannot go on (the policy failed on some rank, ranks computed different plans);
    raised on every rank at the same step."""


class StalledRankError(BalancerError):
    """A peer stopped answering an eplb collective within the watchdog's deadline
    (:class:`eplb.runtime._watchdog.CollectiveWatchdog`, ``BalancerConfig.collective_timeout_s``).

    Attributes:
        ranks: the ranks (in the group) that did not reach the collective (empty when unknown).
        collective: what was waited for.
    """

    def __init__(self, msg: str, ranks: tuple[int, ...] = (), collective: str = "") -> None:
        super().__init__(msg)
        self.ranks = ranks
        self.collective = collective
