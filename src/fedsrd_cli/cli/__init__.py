"""The `fedsrd` command line, one module per role.

    app.py          the Typer app, --version/--debug, `command` (registers a command)
    exits.py        FedsrdError -> one line on stderr and its exit code (the only place)
    options.py      the options several commands share (--global, --out, --sign-key, ...)
    render.py       result views several commands share
    coordinator.py  init, roster (the coordinator's set-up of a round)
    aggregate.py    aggregate
    broadcast.py    broadcast
    inbox.py        status (the uploads in the coordinator's inbox)
    training.py     train-local
    client.py       sparsify, apply
    model.py        eval, export
    files.py        inspect, unpack, sign, seal, open
    keys.py         keygen, agreement-key
    simulation.py   demo-assets, simulate

Every command checks its flags, calls one library function and prints through
output.Output. Commands that load a model import transformers/peft inside their body,
so the other commands start without them. cli/ may import every folder but flower/;
nothing outside cli/ imports it (entry.py aside).
"""

from __future__ import annotations

from fedsrd_cli.cli.app import app, main

# Importing a role module registers its commands, in the order `fedsrd --help` lists them.
# isort: off
from fedsrd_cli.cli import coordinator  # noqa: F401, E402
from fedsrd_cli.cli import aggregate  # noqa: F401, E402
from fedsrd_cli.cli import broadcast  # noqa: F401, E402
from fedsrd_cli.cli import inbox  # noqa: F401, E402
from fedsrd_cli.cli import training  # noqa: F401, E402
from fedsrd_cli.cli import client  # noqa: F401, E402
from fedsrd_cli.cli import model  # noqa: F401, E402
from fedsrd_cli.cli import files  # noqa: F401, E402
from fedsrd_cli.cli import keys  # noqa: F401, E402
from fedsrd_cli.cli import simulation  # noqa: F401, E402

# isort: on
from fedsrd_cli.cli.options import METHODS_HELP

__all__ = ["METHODS_HELP", "app", "main"]
