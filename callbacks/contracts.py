"""What each callback reads and sets, stated once beside its class, and the two uses of it at start-up:

* :func:`check_algorithm_callbacks` refuses a run whose algorithm needs a callback that was removed
  (``python train.py ~callbacks.baseline`` under SPEAR), naming it, how it was removed and why it is needed.
  The need is read from what the data module and learner were built with (``data.replay``,
  ``data.toolcall_bonus``), not from the loss's name.
* The same function returns the callbacks in *contract order*: one that sets what another reads runs first
  (validation and the entropy monitor add to the iteration record before the report writes it), whatever
  the order of ``conf/callbacks/``. Callbacks without a contract keep their places.

Names in ``reads``/``sets``: ``data.<attr>`` (the rollout data module), ``learner.<attr>`` (the
LightningModule), ``record.<key>`` (the record of the iteration whose last step just ran, see
:mod:`callbacks._iteration`); ``record.metrics.<metric>`` may end in ``*``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from spear_lit.config_check import ConfigError


@dataclass(frozen=True)
class Contract:
    """What a callback reads and sets; for one the algorithm needs, when and why.

    Attributes:
        reads, sets: names as in the module docstring.
        key: its name in ``conf/callbacks/rl.yaml`` (``callbacks.<key>``).
        needed_if: ``(data, learner) -> bool``: the run's algorithm needs the callback.
        when: ``needed_if`` in words (``"replay is on (data.replay is set)"``).
        why: what the algorithm loses without it, and the way out.
    """

    reads: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    key: str | None = None
    needed_if: Callable | None = None
    when: str = ""
    why: str = ""


ALGORITHM_CALLBACKS: list[type] = []  # the classes with a ``needed_if``, in definition order


def contract(
    *,
    reads: tuple[str, ...] = (),
    sets: tuple[str, ...] = (),
    key: str | None = None,
    needed_if: Callable | None = None,
    when: str = "",
    why: str = "",
):
    """Class decorator: ``cls.contract = Contract(...)``, shown at the end of the class docstring; a class
    with ``needed_if`` joins :data:`ALGORITHM_CALLBACKS`."""

    def wrap(cls):
        cls.contract = Contract(tuple(reads), tuple(sets), key, needed_if, when, why)
        lines = [f"        Reads: {', '.join(reads) or '-'}.", f"        Sets: {', '.join(sets) or '-'}."]
        if needed_if is not None:
            lines.append(f"        Required (``callbacks.{key}``) when {when}: {why}.")
        cls.__doc__ = (
            (cls.__doc__ or "").rstrip()
            + "\n\n    Contract (callbacks/contracts.py):\n"
            + "\n".join(lines)
            + "\n"
        )
        if needed_if is not None:
            ALGORITHM_CALLBACKS.append(cls)
        return cls

    return wrap


def check_algorithm_callbacks(data, learner, callbacks: dict[str, object | None]) -> list:
    """Refuse a run that lacks a callback its algorithm needs; return the callbacks in contract order.

    Args:
        data, learner: the instantiated data module and LightningModule.
        callbacks: ``name -> callback`` as configured (``callbacks.<name>``); ``None`` for one set to null.

    Raises:
        ConfigError: naming every missing callback (``callbacks.<key>`` and its class), how it was removed
            and why the run needs it.
    """
    present = [cb for cb in callbacks.values() if cb is not None]
    problems = []
    for cls in ALGORITHM_CALLBACKS:
        c = cls.contract
        if any(isinstance(cb, cls) for cb in present) or not c.needed_if(data, learner):
            continue
        name = f"callbacks.{c.key} ({cls.__module__.split('.')[0]}.{cls.__name__})"
        if c.key not in callbacks:
            how = f"was removed (`~callbacks.{c.key}`, or the callbacks group has no `{c.key}`)"
        elif callbacks[c.key] is None:
            how = f"was set to null (`callbacks.{c.key}=null`)"
        else:
            how = f"was replaced by {type(callbacks[c.key]).__name__}"
        problems.append(f"{name} {how}, but {c.when}: {c.why}")
    if problems:
        raise ConfigError("; ".join(problems))
    return contract_order(present)


def contract_order(callbacks: list) -> list:
    """``callbacks`` with every one that sets what another reads before that one; otherwise in the given
    order (a stable topological sort). Raises ``ValueError`` on a cycle."""

    def feeds(a, b) -> bool:
        sets = getattr(getattr(a, "contract", None), "sets", ())
        reads = getattr(getattr(b, "contract", None), "reads", ())
        return a is not b and any(fnmatchcase(s, r) or fnmatchcase(r, s) for s in sets for r in reads)

    left, out = list(callbacks), []
    while left:
        ready = next((b for b in left if not any(feeds(a, b) for a in left)), None)
        if ready is None:
            raise ValueError(f"callbacks feed each other in a cycle: {[type(c).__name__ for c in left]}")
        out.append(ready)
        left.remove(ready)
    return out
