"""An options file and ``--print_config`` for the project commands, as LightningCLI's subcommands have.

    esft eval --model runs/quickstart/hf --tasks reverse_words --print_config > eval.yaml
    esft eval --config eval.yaml --num-examples 50      # the file's options; flags beside it win

The file is a YAML mapping of the command's own options, named as ``--print_config`` prints them
(the flag without its dashes, ``-`` as ``_``: ``num_examples``). Its values become the defaults of
this parse, so a flag given beside the file wins wherever it stands, and a required option the
file gives need not be a flag. Values are checked like flags: a string goes through the option's
type, a value must be one of its choices, and a key that names no option is an error naming the
file and the key. Commands whose ``--config`` already names another file (curate, distill-data,
sweep, tune, pipeline) take the options file as ``--options``.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

FILE_DEST = "options_file"
OWN = {"help", FILE_DEST, "print_config"}  # this parser's own flags: not options of the command


class CommandParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` with an options file (`options_flag`, default ``--config``)
    and ``--print_config``. A subcommand's parser is one too: ``add_subparsers(parser_class=CommandParser)``,
    then each ``add_parser(..., options_flag=...)`` has its own."""

    def __init__(self, *args: Any, options_flag: str = "--config", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(options_flag, dest=FILE_DEST, metavar="FILE",
                          help="YAML of this command's options (as --print_config prints them); flags beside it win")
        self.add_argument("--print_config", action="store_true", help="print the resolved options as YAML and exit")

    def parse_known_args(self, args=None, namespace=None):
        """Parse twice: once to find the options file (required options waived), then with the
        file's values as the defaults. With ``--print_config``, print the options and exit."""
        args = sys.argv[1:] if args is None else list(args)
        values, print_config = {}, False
        if not {"-h", "--help"} & set(args):  # help: the usage then shows which options are required
            with self._waived(self._actions):
                first, _ = super().parse_known_args(args, argparse.Namespace())
            values, print_config = self._read(getattr(first, FILE_DEST)), first.print_config
        waived = self._actions if print_config else [a for a in self._actions if values.get(a.dest) is not None]
        namespace = namespace if namespace is not None else argparse.Namespace()
        for dest, value in values.items():
            setattr(namespace, dest, value)
        with self._waived(waived):
            parsed, extras = super().parse_known_args(args, namespace)
        if parsed.print_config:
            print(yaml.safe_dump(self.options(parsed), sort_keys=False), end="")
            self.exit(0)
        return parsed, extras

    def options(self, namespace: argparse.Namespace) -> dict[str, Any]:
        """The command's options in `namespace`, by name, in the order the parser lists them."""
        dests = dict.fromkeys(a.dest for a in self._options())
        return {dest: getattr(namespace, dest) for dest in dests}

    def _options(self) -> list[argparse.Action]:
        return [a for a in self._actions if a.dest not in OWN and a.dest != argparse.SUPPRESS
                and not isinstance(a, argparse._SubParsersAction)]

    def _read(self, path: str | None) -> dict[str, Any]:
        """The options file's values by option name, converted and checked like flags."""
        if path is None:
            return {}
        try:
            values = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            self.error(f"{path}: cannot read the options file: {e}")
        if values is None:
            return {}
        if not isinstance(values, dict):
            self.error(f"{path}: an options file is a mapping of option names to values, not {type(values).__name__}")
        actions = {}
        for action in self._options():
            actions.setdefault(action.dest, action)  # the first of options sharing a name (--trl, then --no-trl)
        out = {}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in actions:
                self.error(f"{path}: unknown option {key!r}; the options of {self.prog} are: {', '.join(actions)}")
            out[dest] = self._value(actions[dest], value, f"{path}: option {key!r}")
        return out

    def _value(self, action: argparse.Action, value: Any, where: str) -> Any:
        """`value` as the flag would give it: strings through the option's type, a single value
        made a list for an option that takes several, every item one of the choices."""
        if value is None:
            return None
        if action.nargs == 0:  # a switch (store_true, store_false, store_const)
            if not isinstance(value, type(action.const)):
                self.error(f"{where}: expected {type(action.const).__name__}, got {value!r}")
            return value
        many = action.nargs in ("*", "+") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
        items = value if isinstance(value, list) else [value]
        if not many and isinstance(value, list):
            self.error(f"{where}: takes one value, got a list")
        converted = []
        for item in items:
            if isinstance(item, str) and action.type is not None:
                try:
                    item = action.type(item)
                except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                    self.error(f"{where}: invalid value {item!r} ({e})")
            if action.choices is not None and item not in action.choices:
                self.error(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
            converted.append(item)
        return converted if many else converted[0]

    @staticmethod
    @contextmanager
    def _waived(actions: list[argparse.Action]):
        """Within the block, `actions` are not required (the options file may give them)."""
        required = [a for a in actions if a.required]
        for a in required:
            a.required = False
        try:
            yield
        finally:
            for a in required:
                a.required = True
