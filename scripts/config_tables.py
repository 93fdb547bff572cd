"""The README's config-group and key tables, generated from the configs and the schema (diffcli/help.py).

    python scripts/config_tables.py      # prints the two Markdown tables the README carries

tests/test_help.py keeps the README's copy identical to this output.
"""

from diffcli.help import group_table, key_table


def tables() -> str:
    return group_table() + "\n\n" + key_table()


if __name__ == "__main__":
    print(tables())
