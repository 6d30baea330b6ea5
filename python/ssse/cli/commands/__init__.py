"""One module per command, each with ``run(args) -> int``: it calls the library (or the
experiments) and prints what it did."""
