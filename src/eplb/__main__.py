"""``python -m eplb``: the same as the ``eplb`` console script."""

from eplb.cli import main

main()
