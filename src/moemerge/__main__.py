"""``python -m moemerge`` and ``torchrun -m moemerge``: the command line."""

from .cli import main

main()
