"""``python -m fishim`` is the ``fishim`` command."""

from fishim.cli import main

main(prog_name="fishim")
