"""Write docs/OPTIONS.md from the option tables of every command; --check only compares.

    python scripts/options_doc.py          # regenerate the page after changing a table
    python scripts/options_doc.py --check  # exit 1 when the page and the tables differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from netvlad_client.cli import build_parser as client_parser
from netvlad_client.options import FALSE_WORDS, TRUE_WORDS, markdown_reference
from netvlad_server.config import build_parser as server_parser
from netvlad_server.models_cli import build_parser as models_parser

PAGE = Path(__file__).resolve().parent.parent / "docs" / "OPTIONS.md"

INTRO = f"""# Options

Every flag of every command, with its environment variable and default. This page is generated
from the commands' parsers and their option tables (`SERVER_OPTIONS` in
`server/netvlad_server/config.py`, `OPTIONS` in each subcommand module of
`client/netvlad_client/cli/`, `FETCH_OPTIONS` in `server/netvlad_server/fetch.py`): change a
table, then run `python scripts/options_doc.py`; `tests/test_options.py` fails while the page
and the code differ.

The same rules hold for every command (`client/netvlad_client/options.py`):

- A flag beats its environment variable, which beats the default.
- An empty (or blank) environment variable counts as unset.
- Booleans are `{"`, `".join(TRUE_WORDS)}` or `{"`, `".join(FALSE_WORDS)}`, in any case;
  anything else is refused.
- A bad value stops the command before any work with a usage error (exit status 2) that names
  the flag (`argument --port: ...`) or the variable (`environment variable NETVLAD_PORT='x': ...`).

See [SERVER.md](SERVER.md) for what the server settings do and [CLIENT.md](CLIENT.md) for the
client library and commands.
"""


def render() -> str:
    """The whole page."""
    parsers = (server_parser(), client_parser(), models_parser())
    return "\n".join([INTRO, *(markdown_reference(parser) for parser in parsers)])


def main(argv: list[str] | None = None) -> int:
    """Write the page, or with --check report whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE} is out of date: run python scripts/options_doc.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
