"""``moetrain-train``'s start-up checks, before Hydra runs the job and before the trainer's heavy
imports: compose the config the command line asks for and turn Hydra's multi-line reports (an
unknown key, a misspelled preset, a malformed override) into one line naming the setting and
the fix. Light: Hydra, OmegaConf and the config schema only."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from pathlib import Path

from omegaconf import DictConfig

# moetrain/configs/: package data, so editable and wheel installs alike find it
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PROG = "moetrain-train"


class StartupError(ValueError):
    """A command line ``moetrain-train`` cannot run, with the one-line reason."""


def hydra_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed as Hydra parses it (flags such as ``-m``, ``--cfg``; ``overrides``)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def presets(group: str) -> list[str]:
    """The presets of config group ``group`` (``model``: tiny, tiny_dense, ...)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and presets(p.name))


def first_job_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` with each sweep (``a=1,2``, ``range(...)``, ``choice(...)``) replaced by
    its first value: the overrides of a multirun's first job, to check before Hydra starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for raw, override in zip(overrides, parsed, strict=True):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()), "")
            out.append(f"{override.get_key_element()}={first}")
        else:
            out.append(raw)
    return out


def _missing_preset(message: str) -> str | None:
    found = re.search(r"Could not find '([^'/]+)/([^']+)'", message)
    if found is None:
        return None
    group, name = found.groups()
    valid = presets(group)
    guess = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {group}={guess[0]}?" if guess else ""
    return f"{group}={name}: no such preset; {group} is one of {', '.join(valid)}{hint}"


def _unknown_key(cause: BaseException) -> str | None:
    """The line for an override of a key the config lacks (OmegaConf's ConfigKeyError)."""
    from moetrain.config.validate import closest_key_fix

    full_key = getattr(cause, "full_key", None)
    key = getattr(cause, "key", None)
    schema = getattr(cause, "object_type", None)
    if not full_key or key is None:
        return None
    names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
    fix = closest_key_fix(str(full_key), str(key), names)
    group = str(full_key).replace(".", "/")
    if (CONFIG_DIR / group).is_dir():  # model.moe=... for a group: the preset syntax
        fix = f"{group.replace('/', '.')} is a config group; write {group}=<preset>"
    return f"{full_key}: unknown key; {fix}"


def hydra_error_line(err: BaseException) -> str:
    """One line for a Hydra composition error: the setting and the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    message = str(err)
    if isinstance(err, MissingConfigException):
        line = _missing_preset(message)
        if line:
            return line
    cause = err.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        line = _unknown_key(cause)
        if line:
            return line
    if isinstance(err, OverrideParseException):
        bad = re.search(r"override '([^']*)'", message)
        why = message.splitlines()[1] if len(message.splitlines()) > 1 else "malformed"
        name = bad.group(1) if bad else "override"
        return f"{name}: not an override ({why}); write key=value, e.g. train.steps=50"
    if cause is not None and getattr(cause, "full_key", None):
        first = str(cause).splitlines()[0]
        return f"{cause.full_key}: {first}"  # type: ignore[attr-defined]
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def compose_checked(overrides: list[str]) -> DictConfig:
    """The composed config, raising :class:`StartupError` with one line for a Hydra error and
    ``ConfigError`` for a ``+key`` the schema lacks."""
    from hydra.errors import HydraException

    from moetrain.train.cli import compose_config

    try:
        return compose_config(overrides)
    except HydraException as err:
        raise StartupError(hydra_error_line(err)) from err


def fail(message: str) -> None:
    """Print ``moetrain-train: error: <message>`` (rank 0 of a launch only) and exit 2."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def register_help_schema() -> None:
    """For ``--help``: an empty stand-in for the ``config_schema`` node the root config's
    defaults name, so Hydra composes the help page (groups, presets, usage) without importing
    the schema's modules (torch and the model code): the help shows no config values."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node={})
