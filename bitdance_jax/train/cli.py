"""The trainer's command line: ``--config`` (ml_collections config_flags) with ``--config.<field>=<value>`` overrides, the workdir and the multi-process flags.

    python -m bitdance_jax.train --config configs/<name>.py[:<arg>] --workdir DIR \\
        [--config.<field>=<value> ...] [--allow_config_change] [--coordinator HOST:PORT --num-processes N --process-id I]
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Callable

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from bitdance_jax.parallel import distributed
from bitdance_jax.train.trainer import NonFiniteLossError, train


class UsageError(ValueError):
    """A bad command line (unknown flag or config field, bad value, missing file)."""


def config_flag_values(argv: list[str], define_flags: Callable[[flags.FlagValues], None]
                       ) -> flags.FlagValues:
    """A fresh set of flags for parsing ``argv``: ``--config`` (with its ``--config.<field>``
    overrides) and what ``define_flags`` adds. No value leaks from one parse to the next;
    config_flags reads its overrides from ``argv``, not from ``sys.argv``."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file (configs/<name>.py, optionally :<argument>)",
        lock_config=True, flag_values=fv, sys_argv=argv)
    define_flags(fv)
    return fv


def _trainer_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "checkpoints, logs, samples and the export",
                        flag_values=fv)
    flags.DEFINE_bool("allow_config_change", False,
                      "resume although the config differs from the saved one in fields that "
                      "break exact resume (model, batch, data, seed, ...)", flag_values=fv)
    distributed.define_absl_flags(fv)


def unknown_field_message(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """Why ``config.<dotted>`` cannot be set (naming the fields that exist), or None."""
    node, walked = config, "config"
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            return (f"unknown config field '{walked}.{part}' "
                    f"(fields of {walked}: {', '.join(known) or 'none'})")
        node, walked = node[part], f"{walked}.{part}"
    return None


def parse_config(argv: list[str], define_flags: Callable[[flags.FlagValues], None]
                 ) -> tuple[ml_collections.ConfigDict, flags.FlagValues]:
    """``argv`` (program name first) -> (config, flags) with ``--config`` required and the
    flags ``define_flags`` adds; ``UsageError`` naming what is wrong."""
    fv = config_flag_values(argv, define_flags)
    try:
        fv(argv)
    except (flags.Error, ValueError, OSError) as e:  # a config file missing or refusing its argument
        lines = [line for line in str(e).splitlines() if line.strip()]
        # config_flags embeds the config file's traceback: keep what was wrong, not where.
        raise UsageError(lines[0] + (f" {lines[-1]}" if "Traceback" in str(e) else "")) from None
    except (AttributeError, KeyError) as e:
        # A locked ConfigDict refused an override: load the config without overrides to
        # name the unknown field and the fields that do exist.
        plain_argv = [a for a in argv if not a.startswith("--config.")]
        plain = config_flag_values(plain_argv, define_flags)
        plain(plain_argv)
        config = plain["config"].value
        for arg in argv[1:]:
            if arg.startswith("--config."):
                message = unknown_field_message(config, arg[len("--config."):].split("=", 1)[0])
                if message:
                    raise UsageError(message) from None
        raise UsageError(f"bad config override: {e}") from None
    config = fv["config"].value
    if config is None:
        raise UsageError("--config is required (e.g. --config configs/default.py)")
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags defers load errors
        try:
            config.kind
        except OSError as e:
            raise UsageError(f"cannot load config file {fv['config'].config_filename!r}: "
                             f"{str(e).splitlines()[-1].strip()}") from None
    return config, fv


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, str, flags.FlagValues]:
    """``argv`` (program name first) -> (config, workdir, flags); ``UsageError`` if bad."""
    config, fv = parse_config(distributed.normalize_argv(argv), _trainer_flags)
    if not fv["workdir"].value:
        raise UsageError("--workdir is required")
    return config, fv["workdir"].value, fv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(config_flag_values(argv[:1], _trainer_flags).get_help())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config, workdir, fv = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.initialize_from(fv)
    try:
        summary = train(config, workdir, allow_config_change=fv["allow_config_change"].value)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:  # bad config values, data or checkpoints
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2, default=str))
    return 0
