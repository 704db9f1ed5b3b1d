"""One option machinery for every command: precedence, booleans, errors, the generated page.

Also the shape rules of the CLI package (subcommands never import each other, the client never
imports the server) and the one progress line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import io
from pathlib import Path

import pytest
from netvlad_client import ClientConfig
from netvlad_client.cli import build_parser
from netvlad_client.cli import main as client_main
from netvlad_client.cli.common import CONNECTION_OPTIONS
from netvlad_client.options import (
    Option,
    OptionError,
    add_options,
    parse_args,
    parse_bool,
    positive_int,
    resolve,
)
from netvlad_client.progress import Progress

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client" / "netvlad_client"

# Every environment variable the commands read; renaming one breaks deployments.
CLIENT_VARIABLES = {
    "NETVLAD_TARGET", "NETVLAD_CLIENT_TIMEOUT", "NETVLAD_CLIENT_RETRIES", "NETVLAD_CLIENT_TLS",
    "NETVLAD_CLIENT_TLS_CA", "NETVLAD_CLIENT_TLS_CERT", "NETVLAD_CLIENT_TLS_KEY",
    "NETVLAD_CLIENT_TLS_SERVER_NAME", "NETVLAD_CLIENT_TOKEN_FILE", "NETVLAD_CLIENT_PRIORITY",
}
EVALUATE_VARIABLES = {
    "NETVLAD_EVAL_DIMS", "NETVLAD_EVAL_RENORMALIZE", "NETVLAD_EVAL_RADIUS",
    "NETVLAD_EVAL_SUPPRESSION", "NETVLAD_EVAL_OUT",
}
FETCH_VARIABLES = {"NETVLAD_MODELS_DIR", "NETVLAD_WEIGHTS_URL"}

TABLE = (
    Option(("--count",), "how many", default=3, convert=positive_int, env="TEST_COUNT"),
    Option(("--loud",), "shout", default=False, kind="bool", env="TEST_LOUD"),
    Option(("--tls",), "secure", default=False, kind="switch", env="TEST_TLS"),
    Option(("--no-plots",), "no figures", default=True, kind="off", dest="plots"),
)


def parsed(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo")
    add_options(parser, TABLE)
    return parse_args(parser, argv, environ)


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "Yes", "on", " on "])
def test_true_words(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "NO", "off"])
def test_false_words(text):
    assert parse_bool(text) is False


@pytest.mark.parametrize("text", ["ture", "2", "y", "enabled", ""])
def test_anything_else_is_not_a_boolean(text):
    with pytest.raises(ValueError, match="expected a boolean"):
        parse_bool(text)


def test_flag_beats_environment_beats_default():
    assert vars(parsed([], {})) == {"count": 3, "loud": False, "tls": False, "plots": True}
    env = {"TEST_COUNT": "7", "TEST_LOUD": "yes", "TEST_TLS": "on"}
    assert vars(parsed([], env)) == {"count": 7, "loud": True, "tls": True, "plots": True}
    got = parsed(["--count", "9", "--no-loud", "--no-plots"], env)
    assert (got.count, got.loud, got.tls, got.plots) == (9, False, True, False)


def test_an_empty_variable_counts_as_unset():
    got = parsed([], {"TEST_COUNT": "", "TEST_LOUD": "  ", "TEST_TLS": ""})
    assert (got.count, got.loud, got.tls) == (3, False, False)


def test_a_false_variable_turns_a_switch_off():
    for word in ("false", "0", "no", "OFF"):
        assert parsed([], {"TEST_TLS": word}).tls is False
    assert parsed(["--tls"], {"TEST_TLS": "false"}).tls is True  # the flag wins


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--count", "0"], {}, "demo: error: argument --count: expected an integer at least 1, got 0"),
    ([], {"TEST_COUNT": "many"},
     "demo: error: environment variable TEST_COUNT='many': expected an integer, got 'many'"),
    ([], {"TEST_LOUD": "ture"},
     "demo: error: environment variable TEST_LOUD='ture': expected a boolean"),
    ([], {"TEST_TLS": "maybe"}, "environment variable TEST_TLS='maybe': expected a boolean"),
])
def test_bad_values_name_the_flag_or_the_variable(argv, env, message, capsys):
    with pytest.raises(SystemExit) as caught:
        parsed(argv, env)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_a_flag_overrides_a_bad_variable():
    assert parsed(["--count", "4"], {"TEST_COUNT": "many"}).count == 4


def test_resolve_without_argparse():
    assert resolve(TABLE, {"count": "5"}, {})["count"] == 5
    with pytest.raises(OptionError, match="argument --count"):
        resolve(TABLE, {"count": "x"}, {})


def test_client_tls_false_means_plaintext(monkeypatch):
    # The bug: NETVLAD_CLIENT_TLS=false used to turn TLS on (any non-empty value but "0" did).
    for word, expected in (("false", False), ("off", False), ("0", False), ("true", True)):
        args = parse_args(build_parser(), ["info"], {"NETVLAD_CLIENT_TLS": word})
        assert args.tls is expected, word


def test_client_tls_rejects_a_non_boolean(capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(build_parser(), ["info"], {"NETVLAD_CLIENT_TLS": "yes please"})
    assert caught.value.code == 2
    assert "environment variable NETVLAD_CLIENT_TLS='yes please': expected a boolean" in \
        capsys.readouterr().err


def test_evaluate_renormalize_typo_is_an_error(tmp_path, monkeypatch, capsys):
    # The bug: NETVLAD_EVAL_RENORMALIZE=ture used to mean false without a word.
    argv = ["evaluate", "--positions", "p.txt", "--descriptors", "d.npy"]
    monkeypatch.setenv("NETVLAD_EVAL_RENORMALIZE", "ture")
    with pytest.raises(SystemExit) as caught:
        client_main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "environment variable NETVLAD_EVAL_RENORMALIZE='ture': expected a boolean" in err
    assert parse_args(build_parser(), [*argv, "--renormalize"]).renormalize is True
    monkeypatch.setenv("NETVLAD_EVAL_RENORMALIZE", "On")
    assert parse_args(build_parser(), argv).renormalize is True
    assert parse_args(build_parser(), [*argv, "--no-renormalize"]).renormalize is False


def test_connection_defaults_are_client_configs():
    defaults = {f.name: f.default for f in dataclasses.fields(ClientConfig)}
    args = parse_args(build_parser(), ["info"], {})
    assert (args.timeout, args.retries, args.tls) == (
        defaults["timeout"], defaults["retries"], defaults["tls"])


def _variables(options) -> set[str]:
    return {option.env for option in options if option.env}


def test_every_variable_name_is_kept():
    from netvlad_client.cli import evaluate
    from netvlad_server.config import SERVER_OPTIONS, ServerConfig
    from netvlad_server.fetch import FETCH_OPTIONS

    assert _variables(CONNECTION_OPTIONS) == CLIENT_VARIABLES
    assert _variables(evaluate.OPTIONS) == EVALUATE_VARIABLES
    assert _variables(FETCH_OPTIONS) == FETCH_VARIABLES
    fields = {f.name for f in dataclasses.fields(ServerConfig)} - {"model_is_default"}
    assert _variables(SERVER_OPTIONS) == {f"NETVLAD_{name.upper()}" for name in fields}


def _options_doc():
    spec = importlib.util.spec_from_file_location("options_doc", ROOT / "scripts/options_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_page_matches_the_tables():
    module = _options_doc()
    assert (ROOT / "docs" / "OPTIONS.md").read_text() == module.render(), (
        "docs/OPTIONS.md is out of date: run python scripts/options_doc.py")


def test_options_page_lists_every_flag_of_every_parser():
    """No flag escapes the tables: what argparse knows, the page shows."""
    page = (ROOT / "docs" / "OPTIONS.md").read_text()
    client = build_parser()
    subcommands = next(a for a in client._actions if isinstance(a, argparse._SubParsersAction))
    parsers = [client, *subcommands.choices.values()]
    from netvlad_server.config import build_parser as server_parser

    parsers.append(server_parser())
    for parser in parsers:
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help", "--version"):
                    assert f"`{flag}" in page or f"/ {flag}`" in page, (parser.prog, flag)


def _imports(path: Path) -> set[str]:
    """Modules (and `module.name` for from-imports) a file imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_subcommands_never_import_each_other_nor_private_names():
    subcommands = ("describe", "info_health", "evaluate")
    for name in subcommands:
        imported = _imports(CLIENT / "cli" / f"{name}.py")
        for other in subcommands:
            if other != name:
                assert f"netvlad_client.cli.{other}" not in imported, (name, other)
        private = [i for i in imported if i.startswith("netvlad_client")
                   and i.rsplit(".", 1)[-1].startswith("_") and "_proto" not in i]
        assert not private, (name, private)


def test_the_client_never_imports_the_server():
    for path in CLIENT.rglob("*.py"):
        assert not any(i.startswith("netvlad_server") for i in _imports(path)), path


def test_progress_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(1000, mode="lines", stream=stream, unit="bytes", label="get")
    for _ in range(100):
        progress.advance(10)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11  # 0 %, each tenth, nothing more at close
    assert lines[-1].startswith("get: [") and "1000 B/1000 B" in lines[-1]
    assert "100.0%" in lines[-1] and "\r" not in stream.getvalue()


def test_progress_bar_and_off():
    stream = io.StringIO()
    progress = Progress(9, mode="bar", stream=stream)
    for _ in range(9):
        progress.advance(1)
    progress.close()
    text = stream.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and "9/9 images 100.0%" in text
    quiet = io.StringIO()
    silent = Progress(9, mode="off", stream=quiet)
    silent.advance(9)
    silent.close()
    assert quiet.getvalue() == ""
