"""`python -m estpipe`: the same as the `estpipe` command (batch scripts use the interpreter that submitted them)."""

from estpipe.entry import main

main()
