"""Subcommands of the ``kvtier`` CLI; each module exposes ``register(subparsers)``.

Convention: ``register`` adds a parser with a help line for the command and for every flag,
and sets ``func=run`` where ``run(args) -> int``. Expected failures raise
``kvtier.cli.CLIError`` (one clear line, exit 2). Heavy imports go inside ``run``.
"""
