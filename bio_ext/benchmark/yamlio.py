"""Reading a benchmark configuration: YAML files and ``--override`` values, before validation.

:func:`yaml_load` is ``yaml.safe_load`` with YAML 1.2's floats (``1e-3`` is a number; PyYAML's YAML
1.1 leaves it a string, which a mode's options refuse). :func:`read_yaml` reads a file, a missing,
binary or unreadable one being a one-line :class:`~bio_ext.benchmark.errors.ConfigFileError`.
:func:`apply_overrides` sets dotted keys; when it changes ``model.mode.type``, the file's
``mode_options`` of the registered modes the new sweep leaves out are dropped with a note in the
log (``--override "model.mode.type=[bp, dfa]"`` on a file with ``bwbpf`` options), while a name
that is no mode at all stays for the schema to report. :mod:`bio_ext.benchmark.schema` validates
the result and re-exports these names.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from ..errors import ConfigError
from . import biotorch
from .errors import ConfigFileError
from .fields import FIELDS

log = logging.getLogger(__name__)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's rule for floats: ``1e-3``, ``5E+2`` and ``.5`` are
    numbers (YAML 1.1 wants a dot and a signed exponent). Everything else is YAML 1.1 as before."""


_EXPONENT = r"(?:[eE][-+]?[0-9]+)"
_FLOAT_12 = re.compile(rf"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*{_EXPONENT}?
    |[-+]?\.[0-9][0-9_]*{_EXPONENT}?
    |[-+]?[0-9][0-9_]*{_EXPONENT}
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
# the float resolver's regex replaced where YAML 1.1 registered it (first characters -+0123456789.),
# its place among the other resolvers kept
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, _FLOAT_12 if tag == "tag:yaml.org,2002:float" else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def yaml_load(text) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats (:class:`_Yaml12Loader`): how config files and
    ``--override`` values are read."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader)


def _sweep_modes(data: Mapping[str, Any]) -> Optional[List[str]]:
    """The raw document's ``model.mode.type`` as a list of resolved mode names (None when absent or
    not names)."""
    mode = data.get("model", {}).get("mode") if isinstance(data.get("model"), Mapping) else None
    if not isinstance(mode, Mapping) or "type" not in mode:
        return None
    t = mode["type"]
    names = t if isinstance(t, list) else [t]
    if not all(isinstance(n, str) for n in names):
        return None
    return [biotorch.MODE_ALIASES.get(n, n) for n in names]


def _mode_options(data: Mapping[str, Any]) -> Dict[str, Any]:
    model = data.get("model")
    mode = model.get("mode") if isinstance(model, Mapping) else None
    options = mode.get("mode_options") if isinstance(mode, Mapping) else None
    return options if isinstance(options, dict) else {}


def _drop_options_of_modes_left_out(before: Mapping[str, Any], after: Dict[str, Any]) -> None:
    """After overrides changed ``model.mode.type``: remove, in place, the file's ``mode_options``
    of registered modes the new sweep leaves out, with a note in the log. Names that are no mode at
    all, and options an override set, stay (the schema reports them)."""
    modes = _sweep_modes(after)
    if modes is None or modes == _sweep_modes(before):
        return
    registered = set(FIELDS["model.mode.type"].choices())
    old, new = _mode_options(before), _mode_options(after)
    for m in list(new):
        name = biotorch.MODE_ALIASES.get(m, m)
        if name in registered and name not in modes and m in old and new[m] == old[m]:
            del new[m]
            log.info("model.mode.mode_options.%s ignored: the overridden model.mode.type (%s) leaves %s out of "
                     "the sweep", m, ", ".join(modes), m)


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars/flow, YAML 1.2 floats) to a
    raw document. When they change ``model.mode.type``, the document's ``mode_options`` of modes
    left out of the sweep are dropped with a note (:func:`_drop_options_of_modes_left_out`)."""
    before = data
    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"--override {item!r}: expected KEY=VALUE, e.g. training.hyperparameters.epochs=2")
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            problems.append(f"--override {item!r}: empty key component in {key!r}")
            continue
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"--override {item!r}: value is not valid YAML ({e.__class__.__name__})")
            continue
        node = data
        for i, p in enumerate(parts[:-1]):
            if p not in node or node[p] is None:
                node[p] = {}
            elif isinstance(node[p], bool) and ".".join(parts[:i + 1]) == "evaluation":
                node[p] = {"enabled": node[p]}
            if not isinstance(node[p], dict):
                problems.append(f"--override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
                break
            node = node[p]
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, what="overrides")
    if isinstance(before, Mapping):
        _drop_options_of_modes_left_out(before, data)
    return data


def read_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML file (YAML 1.2 floats, :func:`yaml_load`). A missing, unreadable or binary file
    is a one-line :class:`~bio_ext.benchmark.errors.ConfigFileError` naming it; a syntax error a
    ConfigError quoting the parser."""
    if not os.path.isfile(path):
        raise ConfigFileError(path, "no such config file; pass the path of a benchmark .yaml file "
                              "(e.g. configs/quickstart_digits.yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigFileError(path, f"not a YAML text file: byte 0x{e.object[e.start]:02x} at offset {e.start} is "
                              "not UTF-8; pass the benchmark's .yaml file, not a binary or checkpoint file") from None
    except OSError as e:
        raise ConfigFileError(path, f"cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"], what="benchmark configuration") from None
    return data if data is not None else {}
