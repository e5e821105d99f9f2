"""`python -m qilin_lite` runs the CLI."""

from .cli import main

main()
