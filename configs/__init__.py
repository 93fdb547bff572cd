"""diffcli's shipped configs; importing the package (Hydra does, to read them) registers their schema."""

from diffcli.schema import register

register()
