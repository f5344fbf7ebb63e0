"""`python -m densenet_fast bench models` as a script (`--help` for the options)."""

import sys

from densenet_fast import cli

if __name__ == "__main__":
    raise SystemExit(cli.main(["bench", "models", *sys.argv[1:]]))
