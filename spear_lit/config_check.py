"""Refuse a bad run configuration at the edge, before any process rolls out: one line that names the key,
the value and what is allowed (``train.py`` prints it as ``config error: ...`` and exits with status 2).

Plain values in: ``check_config`` takes the composed configuration as dicts (``OmegaConf.to_container``),
so the library never reads a config object. The rules, all derived from what already exists rather than
from a list of keys:

1. **Top-level keys** are those of the primary config (``conf/config.yaml``: its own keys and the groups of
   its defaults list). Any other, even added with ``+`` (``+iteraions=5``, as Hydra's own hint suggests),
   is refused with the nearest known key. On the command line, the first part of every override must also
   be a config group (``+experiment=...``, ``+term@loss.terms.entropy=entropy``) or ``hydra``.
2. **The primary config's own values keep their default's type**: ``iterations: 60`` makes ``iterations``
   an integer, ``export_hf: true`` a boolean (an integer is accepted where the default is a float). A node
   it defines (``spear``) has exactly the keys it defines.
3. **A node with ``_target_`` takes its callable's parameters** (``inspect.signature``; keys starting with
   ``_`` are Hydra's). A key the callable does not take is refused with the nearest parameter, unless it
   takes ``**kwargs``: so ``+data.advantage.step_weight=1.0`` is accepted exactly when the advantage
   function has that keyword, and ``+data.grup_size=8`` is refused. Each value must match the parameter's
   annotation: ``int``, ``float``, ``bool``, ``str``, ``None``, ``Literal``, unions, lists/tuples/sequences
   and dicts of those (checked element by element). A class annotation accepts only a node that builds it
   (one with ``_target_``, checked in turn); annotations it cannot judge (callables, type variables,
   unresolvable names) are not checked. Other nodes (``callbacks``, ``loss.terms``, ``data.filters``) are
   name → value maps whose owners validate them.
4. **A single string where a list is expected** (``task.train_files=/data/x.jsonl``) is taken as a
   one-element list: returned as a fix for the caller to apply.
5. **World sizes** (``trainer.devices × trainer.num_nodes``, when known before launch): the prompts of an
   iteration split evenly over ranks (a group never spans ranks), a vLLM tensor-parallel replica fits the
   ranks and has a seed (unseeded TP ranks would sample different tokens and hang), FSDP2's
   ``data_parallel_size × tensor_parallel_size`` is the world size.
6. **Precision**: the optimizer keeps fp32 weights and state (``model.dtype`` and ``trainer.precision`` not
   half precision) unless ``learner.allow_half_precision_weights`` opts in
   (:mod:`spear_lit.training.precision`).

Errors name the key the user typed: a value reached through an interpolation (``data.iterations:
${iterations}``) is reported at its source (``iterations``).
"""

from __future__ import annotations

import collections.abc as cabc
import difflib
import importlib
import inspect
import os
import re
import types
import typing
from functools import cache
from pathlib import PurePath
from typing import Any, Literal, Union

_INTERP = re.compile(r"\$\{(\.*[\w.]+)\}")  # a plain ${a.b} or relative ${..a}; not resolvers (${x:y})
_LISTS = (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection, cabc.MutableSequence)
_DICTS = (dict, cabc.Mapping, cabc.MutableMapping)


class ConfigError(ValueError):
    """A configuration value the run refuses; the message names the key, the value and what is allowed."""


# ----------------------------------------------------------------------------------------- entry points
def check_command_line(overrides: list[str], primary: dict, groups: set[str]) -> None:
    """Rule 1 on the command line, before Hydra composes: ``iteraions=5`` or ``+iteraions=5`` is refused
    with the nearest known key. ``primary``: the primary config file; ``groups``: the config group names."""
    top_level = top_level_keys(primary) | set(groups) | {"hydra"}
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:  # flags (-m, --cfg job) and their values
            continue
        key = arg.split("=", 1)[0].lstrip("~+")
        first = re.split(r"[./@]", key, maxsplit=1)[0]
        if first not in top_level:
            raise ConfigError(_unknown(first, sorted(top_level), f" in '{arg}'"))


def check_config(config: dict, raw: dict, primary: dict) -> dict[str, list]:
    """Check a composed configuration (rules 1-5 of the module docstring); raise :class:`ConfigError`.

    Args:
        config: the composed configuration, resolved (``OmegaConf.to_container(cfg, resolve=True)``).
        raw: the same, unresolved (to report a value at the key it was interpolated from).
        primary: the primary config file as written (``conf/config.yaml``, with its ``defaults`` list).

    Returns:
        fixes ``{key: [value]}``: single strings given where a list is expected (rule 4), to be set
        before instantiating.
    """
    _check_primary(config, primary)
    _check_world(config)
    _check_precision(config)
    fixes: dict[str, list] = {}
    for path, node in _target_nodes(config, ""):  # imports the targets: last, so the rest fails fast
        _check_target(path, node, raw, fixes)
    return fixes


def one_line(error: Exception, raw: dict | None = None) -> str:
    """An instantiation error as one line: the failing constructor's own message, after the config key
    Hydra names in its ``full_key: ...`` line, taken back through interpolations when the unresolved
    config ``raw`` is given (``data.agent.task`` → ``task: /data/x.jsonl:3: not valid JSON ...``)."""
    text = str(error)
    key = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("full_key:")), "")
    key = _source(key, raw) if key and raw else key
    msg = " ".join(str(error.__cause__ or error).split())
    if error.__cause__ is None:
        return " ".join(text.split())
    return f"{key}: {msg}" if key and not msg.startswith(key) else msg


def top_level_keys(primary: dict) -> set[str]:
    """Keys of the primary config plus the groups of its defaults list (``model: tiny_sft`` → ``model``)."""
    keys = {k for k in primary if k not in ("defaults", "hydra")}
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            for group in entry:
                keys.add(group.split()[-1].lstrip("/").split("@")[-1].split("/")[0].split(".")[0])
    return keys


# ------------------------------------------------------------------------------------------ rules 1, 2
def _check_primary(config: dict, primary: dict) -> None:
    known = top_level_keys(primary)
    for key in config:
        if key not in known:
            raise ConfigError(_unknown(key, sorted(known)))
    own = {k: v for k, v in primary.items() if k not in ("defaults", "hydra")}
    _check_like_default(config, own, "")


def _check_like_default(node: dict, default: dict, prefix: str) -> None:
    """Values of ``node`` have the type of the same key in ``default``; nested dicts have its keys."""
    for k, d in default.items():
        key, v = f"{prefix}{k}", node.get(k)
        if isinstance(d, dict) and "_target_" not in d and isinstance(v, dict):
            for extra in v.keys() - d.keys():
                raise ConfigError(_unknown(f"{key}.{extra}", list(d)))
            _check_like_default(v, d, f"{key}.")
        elif type(d) in (bool, int, float) and v != "???" and not _ok(v, type(d)):
            raise ConfigError(_bad_value(key, v, type(d), d))


# ---------------------------------------------------------------------------------------- rules 3, 4
def _target_nodes(node: Any, path: str):
    """``(dotted path, node)`` of every dict with a ``_target_``, outermost first."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for k, v in node.items():
            if not str(k).startswith("_"):
                yield from _target_nodes(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _target_nodes(v, f"{path}.{i}")


def _check_target(path: str, node: dict, raw: dict, fixes: dict) -> None:
    target = _locate(str(node["_target_"]))
    if target is None:  # not importable here: instantiate reports it with the target's name
        return
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    hints = _hints(target)
    where = _source(path, raw) if path else path
    for k, v in node.items():
        k = str(k)
        if k.startswith("_"):
            continue
        key = f"{where}.{k}" if where else k
        if k not in named:
            if takes_any:
                continue
            # suggest the knobs (keyword-only or defaulted), not the arguments a partial's caller passes
            knobs = [n for n, p in named.items() if p.default is not p.empty or p.kind is p.KEYWORD_ONLY]
            raise ConfigError(
                _unknown(key, knobs or list(named), f": {node['_target_']} takes no such argument")
            )
        hint = hints.get(k, Any)
        item = _dict_item(hint)
        if isinstance(v, dict) and "_target_" not in v and item is not None:
            for kk, vv in v.items():  # name → value maps: report the element's own key
                if not _ok(vv, item):
                    raise ConfigError(_bad_value(_source(f"{path}.{k}.{kk}", raw), vv, item, None))
        elif not _ok(v, hint):
            if isinstance(v, str) and _ok([v], hint):
                fixes[_source(f"{path}.{k}" if path else k, raw)] = [v]
                continue
            default = named[k].default
            raise ConfigError(
                _bad_value(
                    _source(f"{path}.{k}" if path else k, raw),
                    v,
                    hint,
                    None if default is inspect.Parameter.empty else default,
                )
            )


@cache
def _locate(dotted: str):
    """The object a ``_target_`` names (module path, then attributes), or ``None``."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:  # noqa: BLE001 - a missing optional package: let instantiate report it
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            return None
    return None


def _hints(target) -> dict:
    """Parameter annotations, evaluated; names that cannot be resolved are left out (not checked)."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - e.g. a name imported only under TYPE_CHECKING
        pass
    out = {}
    unwrapped = inspect.unwrap(fn)
    for name, ann in getattr(unwrapped, "__annotations__", {}).items():
        try:
            out[name] = eval(ann, getattr(unwrapped, "__globals__", {})) if isinstance(ann, str) else ann
        except Exception:  # noqa: BLE001
            continue
    return out


def _dict_item(hint):
    """The value type of a ``dict[str, X]`` annotation (also inside ``... | None``), else ``None``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next((i for a in typing.get_args(hint) if (i := _dict_item(a)) is not None), None)
    args = typing.get_args(hint)
    return args[1] if (typing.get_origin(hint) or hint) in _DICTS and len(args) == 2 else None


def _ok(value, hint) -> bool:
    """Whether a plain config value (None, bool, int, float, str, list, dict) fits the annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, typing.TypeVar):
        return True
    if origin in (Union, types.UnionType):
        return any(_ok(value, a) for a in args)
    if origin is Literal:
        return value in args
    if isinstance(value, dict) and "_target_" in value:
        return True  # built by instantiate; its own node is checked as a target
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if (origin or hint) in _LISTS:
        if not isinstance(value, (list, tuple)):  # tuples: signature defaults
            return False
        if (origin or hint) is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_ok(v, a) for v, a in zip(value, args))
        return all(_ok(v, args[0]) for v in value) if args else True
    if (origin or hint) in _DICTS:
        return isinstance(value, dict) and (len(args) != 2 or all(_ok(v, args[1]) for v in value.values()))
    if hint in (PurePath, os.PathLike) or (inspect.isclass(hint) and issubclass(hint, PurePath)):
        return isinstance(value, str)
    if (origin or hint) is cabc.Callable or hint is typing.Callable:
        return True  # not judged: built elsewhere or resolved by name
    if inspect.isclass(hint):
        return isinstance(value, hint)  # e.g. Tensor: a typed value never is one
    return True


# ------------------------------------------------------------------------------------------- rule 5
def world_size(trainer: dict) -> int | None:
    """``devices × num_nodes`` when it is known before launch (ints, a device list, ``auto`` on CPU)."""
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if isinstance(devices, list):
        n = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        n = devices
    elif isinstance(devices, str) and devices.isdigit() and int(devices) > 0:
        n = int(devices)
    elif trainer.get("accelerator") == "cpu" and devices in ("auto", -1, "-1"):
        n = 1  # Lightning runs one CPU process for "auto"
    else:
        return None
    return n * nodes if isinstance(nodes, int) and nodes > 0 else None


def _check_world(config: dict) -> None:
    trainer = config.get("trainer") or {}
    ws = world_size(trainer)
    if ws is None:
        return
    size = f"the world size {ws} (trainer.devices={trainer.get('devices')} x trainer.num_nodes={trainer.get('num_nodes', 1)})"
    data, rollout, strategy = (
        n if isinstance(n, dict) else {}
        for n in (config.get("data"), config.get("rollout"), trainer.get("strategy"))
    )
    prompts = data.get("prompts_per_iteration")
    if isinstance(prompts, int) and prompts % ws:
        fit = -(-prompts // ws) * ws
        raise ConfigError(
            f"data.prompts_per_iteration={prompts} must be divisible by {size}: each rank rolls "
            f"out whole groups of the iteration's prompts (e.g. data.prompts_per_iteration={fit})"
        )
    tp = rollout.get("tensor_parallel_size")
    if isinstance(tp, int) and tp > 1 and ws % tp:
        raise ConfigError(
            f"rollout.tensor_parallel_size={tp} must divide {size}: a vLLM replica spans "
            f"tensor_parallel_size consecutive trainer ranks"
        )
    _check_tp_seed(rollout)
    sp = strategy.get("sequence_parallel_size", 1)
    if isinstance(sp, int) and sp > 1:
        if ws % sp:
            raise ConfigError(
                f"trainer.strategy.sequence_parallel_size={sp} must divide {size}: a sequence-parallel "
                "group is sp consecutive ranks"
            )
        if data.get("micro_batch_tokens") is None:
            raise ConfigError(
                f"trainer.strategy.sequence_parallel_size={sp} splits packed rows across ranks: set "
                "data.micro_batch_tokens (e.g. data.micro_batch_tokens=16384)"
            )
    dp, stp = strategy.get("data_parallel_size"), strategy.get("tensor_parallel_size")
    if isinstance(dp, int) and isinstance(stp, int) and dp * stp != ws:
        raise ConfigError(
            f"trainer.strategy.data_parallel_size={dp} x trainer.strategy.tensor_parallel_size={stp} "
            f"must equal {size} (e.g. trainer.strategy.data_parallel_size={ws // stp or 1})"
        )


def _check_tp_seed(rollout: dict) -> None:
    tp = rollout.get("tensor_parallel_size")
    if isinstance(tp, int) and tp > 1 and "seed" in rollout and rollout["seed"] is None:
        raise ConfigError(
            f"rollout.seed=null with rollout.tensor_parallel_size={tp}: the ranks of a vLLM replica must "
            "sample with the same per-request seeds, else their schedulers diverge and NCCL hangs; set "
            "rollout.seed (it defaults to ${seed})"
        )


def _check_precision(config: dict) -> None:
    from spear_lit.training.precision import half_precision_weights

    learner, model = (n if isinstance(n, dict) else {} for n in (config.get("learner"), config.get("model")))
    why = half_precision_weights(model.get("dtype"), (config.get("trainer") or {}).get("precision"))
    if why and learner and not learner.get("allow_half_precision_weights", False):
        raise ConfigError(
            f"{why}, so AdamW would keep its weights and state in half precision (an lr-1e-6 step is below "
            "half a bf16 ULP): use model.dtype=float32 trainer.precision=bf16-mixed (fp32 master weights, "
            "bf16 compute) or opt in with learner.allow_half_precision_weights=true"
        )


# ------------------------------------------------------------------------------------------ messages
def _source(key: str, raw: dict) -> str:
    """The key a value was typed at: follows ``${a.b}`` (and relative ``${..b}``) interpolations."""
    parts = key.split(".")
    for _ in range(16):  # interpolation chains are short; a cycle would not resolve anyway
        node: Any = raw
        for i, p in enumerate(parts):
            if isinstance(node, dict):
                node = node.get(p)
            elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
                node = node[int(p)]
            else:
                return ".".join(parts)
            m = _INTERP.fullmatch(node) if isinstance(node, str) else None
            if m:
                ref = m.group(1)
                dots = len(ref) - len(ref.lstrip("."))
                base = parts[: i - dots + 1] if dots else []
                parts = base + ref.lstrip(".").split(".") + parts[i + 1 :]
                break
        else:
            return ".".join(parts)
    return ".".join(parts)


def _unknown(key: str, names: list[str], why: str = "") -> str:
    """``key``'s last part is not one of ``names`` (the keys beside it): name the nearest, or list them."""
    parent, _, leaf = key.rpartition(".")
    full = [f"{parent}.{n}" if parent else n for n in sorted(names)]
    near = difflib.get_close_matches(leaf, sorted(names), n=1, cutoff=0.6)
    hint = (
        f"did you mean '{parent + '.' if parent else ''}{near[0]}'?" if near else f"known: {', '.join(full)}"
    )
    return f"unknown key '{key}'{why} ({hint})"


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        literals = [x for a in args if typing.get_origin(a) is Literal for x in typing.get_args(a)]
        parts = [_describe(Literal[tuple(dict.fromkeys(literals))])] if literals else []
        parts += [_describe(a) for a in args if typing.get_origin(a) is not Literal]
        return " or ".join(dict.fromkeys(p for p in parts if p))
    if origin is Literal:
        return "one of " + ", ".join(dict.fromkeys(_fmt(a) for a in args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if (origin or hint) in _LISTS:
        fixed = (origin or hint) is tuple and args and args[-1] is not Ellipsis
        item = _describe(args[0]).removeprefix("an ").removeprefix("a ") if args else ""
        return f"a list of {len(args) if fixed else ''} {item}s".replace("  ", " ") if item else "a list"
    if (origin or hint) in _DICTS:
        return "a mapping"
    if inspect.isclass(hint) and issubclass(hint, PurePath):
        return "a path"
    return ""  # classes: a plain value never builds one; the other members say what is allowed


_EXAMPLES = {bool: True, int: 8, float: 0.5, str: "text"}


def _bad_value(key: str, value, hint, default) -> str:
    want = _describe(hint) or f"a {getattr(hint, '__name__', hint)} (a node with _target_)"
    example = (
        default
        if default is not None and _ok(default, hint) and not isinstance(default, dict)
        else _example(hint)
    )
    shown = repr(value) if isinstance(value, str) else _fmt(value)
    return f"{key}={shown} must be {want}" + ("" if example is None else f" (e.g. {key}={_fmt(example)})")


def _example(hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return next((e for a in args if a is not type(None) and (e := _example(a)) is not None), None)
    if origin is Literal:
        return args[0]
    if (origin or hint) in _LISTS:
        fixed = (origin or hint) is tuple and args and args[-1] is not Ellipsis
        items = [_example(a) for a in (args if fixed else args[:1])]
        return None if not items or None in items else items
    return _EXAMPLES.get(hint)


def _fmt(value) -> str:
    """A value as typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)
