"""python -m diffcli (and torchrun -m diffcli ...)."""

from .cli import main

if __name__ == "__main__":
    main()
