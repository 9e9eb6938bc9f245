"""`python -m mirror`: the command line."""

from mirror.cli import entry

entry()
