"""``python -m caloadapt`` (also what ``torchrun -m caloadapt`` runs for distributed training)."""

from .cli import main

main()
