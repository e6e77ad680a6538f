"""``--config FILE.yaml``: option defaults for one command from a YAML mapping (default < file < flag).

As with TRL's ``--config``, the file holds the command's options by name (``batch_size: 32`` or
``batch-size: 32``); flags on the command line win over it, and the file wins over built-in defaults.
Positional arguments stay on the command line. A ``--config`` value that does not end in ``.yaml`` or
``.yml`` is left to the command: for a hub dataset it names the dataset's configuration, as in
``datasets.load_dataset(path, name)``. The values reach click as defaults, so they are
converted and range-checked exactly like typed flags.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from prefnoise.errors import PrefnoiseError

GLOBAL_FLAGS = ("-q", "--quiet", "--debug")  # the root's flags that may also follow the subcommand


def is_options_file(value: str) -> bool:
    """Whether a ``--config`` value names an options file (.yaml/.yml), not a hub dataset's config name."""
    return value.lower().endswith((".yaml", ".yml"))


def hoist_global_options(args: list[str]) -> list[str]:
    """``args`` with ``-q/--quiet``, ``--debug`` and ``--config FILE`` moved before the subcommand."""
    end = args.index("--") if "--" in args else len(args)
    hoisted: list[str] = []
    rest: list[str] = []
    index = 0
    while index < end:
        arg = args[index]
        if arg in GLOBAL_FLAGS:
            hoisted.append(arg)
        elif arg == "--config" and index + 1 < end and is_options_file(args[index + 1]):
            hoisted += [arg, args[index + 1]]
            index += 1
        elif arg.startswith("--config=") and is_options_file(arg.split("=", 1)[1]):
            hoisted += ["--config", arg.split("=", 1)[1]]
        else:
            rest.append(arg)
        index += 1
    return hoisted + rest + args[end:]


def _is_group(command: Any) -> bool:
    # typer vendors click, so its groups are recognised by their subcommands, not by click's classes
    return isinstance(getattr(command, "commands", None), dict)


def _command_path(root: Any, args: list[str]) -> list[tuple[str, Any]]:
    """The subcommands ``args`` invoke (``reproduce synthetic`` is two), skipping the root's own options."""
    path: list[tuple[str, Any]] = []
    group = root
    takes_value = {"--config"}
    index = 0
    while index < len(args) and _is_group(group):
        arg = args[index]
        if arg in takes_value:
            index += 2
            continue
        if arg.startswith("-"):
            index += 1
            continue
        command = group.commands.get(arg)
        if command is None:
            break
        path.append((arg, command))
        group = command
        index += 1
        takes_value = set()
    return path


MAX_CONFIG_BYTES = 1 << 20  # an options file is a few lines; 1 MB is far beyond any real one


def _read_text(file: str) -> str:
    """The text of options file ``file``: a regular file of at most MAX_CONFIG_BYTES, read once."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; it is refused below, never read
        with open(os.open(file, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
            kind = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(kind):
                what = "a directory" if stat.S_ISDIR(kind) else "not a regular file (a device, FIFO or socket)"
                raise PrefnoiseError(f"--config {file}: is {what}; give a YAML file")
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise PrefnoiseError(f"--config {file}: no such file") from None
    except IsADirectoryError:
        raise PrefnoiseError(f"--config {file}: is a directory; give a YAML file") from None
    except OSError as error:
        raise PrefnoiseError(f"--config {file}: cannot read it ({error.strerror or error})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise PrefnoiseError(f"--config {file}: is larger than 1 MB; an options file holds a few 'option: value' lines")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PrefnoiseError(f"--config {file}: is not UTF-8 text (byte {error.start})") from None


def _read_mapping(file: str) -> dict[str, Any]:
    import yaml

    text = _read_text(file)
    try:
        loaded = yaml.safe_load(text)
    except RecursionError:
        raise PrefnoiseError(f"--config {file}: is nested too deeply; write 'option: value' lines") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise PrefnoiseError(f"--config {file}:{line} is not valid YAML; write 'option: value' lines") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise PrefnoiseError(f"--config {file}: must map option names to values, got {type(loaded).__name__}")
    return loaded


def config_defaults(root: Any, args: list[str], file: str) -> dict[str, Any]:
    """The click ``default_map`` that makes ``file``'s values the defaults of the command ``args`` invoke."""
    path = _command_path(root, args)
    if not path or _is_group(path[-1][1]):
        raise PrefnoiseError("--config needs a command to apply to, e.g. 'prefnoise corrupt IN OUT --config FILE.yaml'")
    name = " ".join(step for step, _ in path)
    command = path[-1][1]
    options = {p.name: p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", False)}
    spellings = {}
    for param in options.values():
        spellings[param.name] = param.name
        for opt in param.opts + param.secondary_opts:
            spellings[opt.lstrip("-")] = param.name
            spellings[opt.lstrip("-").replace("-", "_")] = param.name
    arguments = set()
    for param in command.params:
        if param.param_type_name == "argument":
            arguments |= {str(param.name).lower(), str(getattr(param, "metavar", None) or "").lower()}
    values: dict[str, Any] = {}
    for key, value in _read_mapping(file).items():
        key = str(key)
        target = spellings.get(key.lstrip("-")) or spellings.get(key.lstrip("-").replace("-", "_"))
        if target is None:
            if key.lower() in arguments:
                raise PrefnoiseError(
                    f"--config {file}: {key} is an argument of prefnoise {name}; give it on the command line"
                )
            known = ", ".join(sorted(p.opts[0] for p in options.values()))
            raise PrefnoiseError(
                f"--config {file}: '{key}' is not an option of prefnoise {name} (its options: {known})"
            )
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict | list) for v in value)):
            raise PrefnoiseError(f"--config {file}: '{key}' must be a value or a list of values, not a mapping")
        values[target] = value
    default_map: dict[str, Any] = values
    for step, _ in reversed(path):
        default_map = {step: default_map}
    return default_map
