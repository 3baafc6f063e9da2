"""The ``livemig`` command (typer + rich)."""
