"""output.py: a table for a pipe or a file is one line per row, cells joined by a tab."""

from __future__ import annotations

from fedsrd_cli.output import data_table, key_value_table, plain_rows


def test_plain_rows_have_no_box_padding_or_trailing_whitespace() -> None:
    table = data_table("file", "status", "problem", title="inbox")
    table.add_row("a.safetensors", "valid", "")
    table.add_row("b.safetensors", "[bold]invalid[/bold]", "two\nlines")
    table.add_row("c.safetensors", "answer [/INST] kept", "-")  # not markup: shown as it is
    assert plain_rows(table) == [
        "inbox",
        "file\tstatus\tproblem",
        "a.safetensors\tvalid",
        "b.safetensors\tinvalid\ttwo lines",
        "c.safetensors\tanswer [/INST] kept\t-",
    ]
    assert plain_rows(key_value_table([("round", 1), ("present", "alice, bob")])) == [
        "round\t1",
        "present\talice, bob",
    ]
