"""``python -m fa4aot``: the command line (fa4aot.tools.cli), as the ``fa4aot`` script runs it.

Imports only the CLI (click and fa4aot's light modules): never torch or the CUTLASS DSL, which
only the commands that compile or measure load, when they run.
"""

from fa4aot.tools.cli import main

if __name__ == "__main__":
    main(prog_name="fa4aot")
