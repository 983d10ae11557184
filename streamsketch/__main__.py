"""``python -m streamsketch``: the command line (see ``streamsketch --help``)."""

from .cli import main

raise SystemExit(main())
