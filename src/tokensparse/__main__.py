"""``python -m tokensparse`` runs the command line (the same as ``tokensparse``)."""

from .cli import main

main()
