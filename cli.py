"""The ``fusioner`` command line: thin entry points over :mod:`pipeline`.

Each command parses its options, checks paths and calls one keyword-only
function of the package. User errors print one line and exit with code 2;
``--verbose`` shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.errors import UserError

app = typer.Typer(
    name="fusioner",
    help=(
        "Open-vocabulary semantic segmentation on frozen vision-language models "
        "(Fusioner, BMVC 2022) as a two-stage pipeline: extract frozen features "
        "into a Zarr cache once, then train and evaluate the fusion module and "
        "decoder from it.\n\n"
        "Example:  fusioner demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"verbose": False}


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors."),
) -> None:
    _STATE["verbose"] = verbose


# --------------------------------------------------------------------------- #
# Commands are registered below, one section per stage.
# --------------------------------------------------------------------------- #


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point with one-line user errors (exit code 2)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args or "-v" in args
    try:
        app(args=args, standalone_mode=False)
    except UserError as err:
        if verbose:
            raise
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as exc:  # typer.Exit and friends
        return int(exc.code or 0)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        if isinstance(err, click.exceptions.ClickException):
            if verbose:
                raise
            err.show()
            return err.exit_code
        if isinstance(err, click.exceptions.Exit):
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
