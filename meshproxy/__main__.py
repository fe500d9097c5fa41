"""`python -m meshproxy`."""

from .cli import main

main()
