"""Command-line options with environment fallbacks: one `Option` table per command.

Every command of the project (`netvlad-server`, `netvlad-client` and its subcommands,
`netvlad-models fetch`) declares its flags as `Option` rows. The same rules then hold everywhere:

* precedence is flag > environment variable > default; an empty variable counts as unset;
* values are converted after parsing, so a bad flag is reported under the flag's name and a bad
  environment value under the VARIABLE's name (`environment variable NAME='text': why`);
* booleans read `1/true/yes/on` and `0/false/no/off` (any case) and nothing else;
* the default lives in the table only; help text and docs/OPTIONS.md are generated from it.

argparse does the parsing (standard library: the thin client's dependencies stay light).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
KINDS = ("value", "bool", "switch", "off")
_TABLES = "_option_tables"  # namespace key under which each parser leaves its table


class OptionError(ValueError):
    """A flag or environment value that cannot be used; the message names it and says why."""


def parse_bool(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off, any case; anything else is a ValueError."""
    value = str(text).strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {text!r}")


def choice(choices: Sequence[str], fold: Callable[[str], str] = str) -> Callable[[str], str]:
    """A converter accepting one of `choices` (after `fold`, e.g. str.lower)."""

    def convert(text: str) -> str:
        value = fold(text.strip())
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {text!r}")
        return value

    return convert


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """A converter accepting whole numbers in [low, high] (no upper bound when high is None)."""

    def convert(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"expected an integer {bound}, got {value}")
        return value

    return convert


positive_int = int_range(1)


def non_negative_float(text: str) -> float:
    """A converter accepting numbers >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A converter accepting finite numbers > 0 (seconds, sizes)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"expected a number > 0, got {text!r}")
    return value


def path_or_none(text: str) -> str | None:
    """A file path, or None for a blank value."""
    return text.strip() or None


@dataclass(frozen=True)
class Option:
    """One flag: its names, environment variable, converter, default and help.

    kind: "value" takes an argument (converted by `convert`); "bool" is --x/--no-x; "switch" is
    a bare --x that turns the setting on; "off" is a bare --no-x that turns it off.
    """

    flags: tuple[str, ...]
    help: str
    default: Any = None
    convert: Callable[[str], Any] = str
    env: str | None = None
    kind: str = "value"
    dest: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None  # shown in help and docs; `convert` enforces them
    shown_default: str | None = None  # how help and docs show the default, when not str(default)
    group: str | None = None  # argparse group title in --help
    one_of: str | None = None  # name of a required set of mutually exclusive options

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option kind {self.kind!r}: expected one of {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        """The long flag, e.g. --max-batch-size."""
        return next(f for f in self.flags if f.startswith("--"))

    @property
    def key(self) -> str:
        """The attribute the parsed value is stored under."""
        return self.dest or self.name.lstrip("-").replace("-", "_")

    def default_text(self) -> str | None:
        """The default as help and docs show it; None when there is nothing to show."""
        if self.shown_default is not None:
            return self.shown_default
        if self.default is None or self.kind in ("switch", "off"):
            return None
        if self.kind == "bool":
            return "on" if self.default else "off"
        return str(self.default)

    def help_text(self) -> str:
        """The help line: the option's help, then its variable and default in parentheses."""
        notes = [f"env {self.env}"] if self.env else []
        default = self.default_text()
        if default is not None:
            notes.append(f"default {default}")
        return self.help + (f" ({'; '.join(notes)})" if notes else "")

    def usage(self) -> str:
        """The flag as docs show it, e.g. `--out DIR` or `--xla / --no-xla`."""
        names = ", ".join(self.flags)
        if self.kind == "bool":
            return f"{names} / --no-{self.name[2:]}"
        if self.kind != "value":
            return names
        return f"{names} {self._metavar()}"

    def _metavar(self) -> str:
        if self.metavar:
            return self.metavar
        if self.choices:
            return "{" + ",".join(self.choices) + "}"
        return self.key.upper()

    def add_to(self, parser: Any) -> None:
        """Add the flag to an argparse parser or group; its value stays None unless given."""
        common: dict[str, Any] = {"dest": self.key, "default": None, "help": self.help_text()}
        if self.kind == "bool":
            parser.add_argument(*self.flags, action=argparse.BooleanOptionalAction, **common)
        elif self.kind == "switch":
            parser.add_argument(*self.flags, action="store_const", const=True, **common)
        elif self.kind == "off":
            parser.add_argument(*self.flags, action="store_const", const=False, **common)
        else:
            parser.add_argument(*self.flags, metavar=self._metavar(), **common)

    def resolve(self, given: Any, environ: Mapping[str, str]) -> Any:
        """The value: the flag's when given, else the variable's when set, else the default."""
        if given is not None and self.kind != "value":
            return given
        if given is not None:
            text, source = str(given), f"argument {'/'.join(self.flags)}"
        elif self.env and environ.get(self.env, "").strip():
            text = environ[self.env]
            source = f"environment variable {self.env}={text!r}"
        else:
            return self.default
        convert = parse_bool if self.kind != "value" else self.convert
        try:
            return convert(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise OptionError(f"{source}: {exc}") from None


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Add a table's flags to a parser (in their groups); `parse_args` resolves them later."""
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for option in options:
        target: Any = parser
        if option.group is not None:
            if option.group not in groups:
                groups[option.group] = parser.add_argument_group(option.group)
            target = groups[option.group]
        if option.one_of is not None:
            if option.one_of not in exclusive:
                exclusive[option.one_of] = target.add_mutually_exclusive_group(required=True)
            target = exclusive[option.one_of]
        option.add_to(target)
    # One key per parser: a subcommand's defaults would overwrite its parent's under one key.
    key = f"{_TABLES}:{parser.prog}"
    parser.set_defaults(**{key: (*(parser.get_default(key) or ()), *options)})


def resolve(
    options: Iterable[Option], given: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Each option's value by precedence (flag > environment > default); OptionError if bad."""
    environ = os.environ if environ is None else environ
    return {option.key: option.resolve(given.get(option.key), environ) for option in options}


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """Parse argv, then resolve the tables of the parser and of the chosen subcommand.

    A bad value ends like any usage error: the message and exit status 2.
    """
    args = parser.parse_args(argv)
    resolve_namespace(parser, args, environ)
    return args


def resolve_namespace(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Replace the raw values in args by resolved ones (see `parse_args`)."""
    tables = [key for key in vars(args) if key.startswith(_TABLES)]
    for options in [vars(args).pop(key) for key in tables]:
        try:
            values = resolve(options, vars(args), environ)
        except OptionError as exc:
            parser.error(str(exc))
        for key, value in values.items():
            setattr(args, key, value)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(options: Sequence[Option]) -> str:
    """A Markdown table of options: flag, environment variable, default, meaning."""
    lines = ["| Flag | Environment | Default | Meaning |", "| --- | --- | --- | --- |"]
    for option in options:
        env = f"`{option.env}`" if option.env else ""
        default = option.default_text()
        if default is None:
            default = "off" if option.kind == "switch" else ""
        lines.append(f"| `{_cell(option.usage())}` | {env} | {_cell(default)} | "
                     f"{_cell(option.help)} |")
    return "\n".join(lines) + "\n"


def _table_of(parser: argparse.ArgumentParser) -> tuple[Option, ...]:
    """The options `add_options` gave this parser (not its subcommands')."""
    return tuple(parser.get_default(f"{_TABLES}:{parser.prog}") or ())


def _as_option(action: argparse.Action) -> Option:
    """A flag added with plain argparse, shown in the same table form."""
    switch = isinstance(action, argparse._StoreTrueAction | argparse._StoreConstAction)
    return Option(tuple(action.option_strings), action.help or "", default=action.default,
                  kind="switch" if switch else "value",
                  metavar=action.metavar if isinstance(action.metavar, str) else None,
                  dest=action.dest)


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line(s) at a fixed width, so the page does not depend on the terminal."""
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups,
                        prefix="")
    return formatter.format_help().strip()


def markdown_reference(parser: argparse.ArgumentParser, level: int = 2) -> str:
    """A Markdown section per command and subcommand: usage, then a table of every flag."""
    table = list(_table_of(parser))
    listed = {flag for option in table for flag in option.flags}
    subcommands: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subcommands.extend(dict.fromkeys(action.choices.values()))
        elif (action.option_strings and not listed & set(action.option_strings)
              and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
              and action.help != argparse.SUPPRESS):
            table.append(_as_option(action))
    text = f"{'#' * level} {parser.prog}\n\n```\n{_usage(parser)}\n```\n"
    if table:
        text += "\n" + markdown_table(table)
    return "\n".join([text, *(markdown_reference(sub, level) for sub in subcommands)])
