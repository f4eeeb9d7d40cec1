"""``python -m eplbctl.cli``: the same entry point as the ``eplbctl`` console script."""

from eplbctl.cli import main

main(prog_name="eplbctl")
