"""`python -m planer` (and `torchrun -m planer`) runs the command line."""

from planer.cli import main

main()
