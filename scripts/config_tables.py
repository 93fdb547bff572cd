"""The config-group and key tables of docs/reference/configs.md, generated from the configs and the schema
(diffcli/help.py).

    python scripts/config_tables.py      # prints the two Markdown tables docs/reference/configs.md carries

tests/test_help.py keeps the copy in docs/reference/configs.md identical to this output.
"""

from diffcli.help import group_table, key_table


def tables() -> str:
    return group_table() + "\n\n" + key_table()


if __name__ == "__main__":
    print(tables())
