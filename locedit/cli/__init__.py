"""The `locedit` command line: one module per verb over shared helpers."""
