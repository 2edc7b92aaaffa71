"""`python scripts/export.py ARGS` is `phi3skip-export ARGS`: phi3skip/commands/export.py.
Needs the project installed (`pip install -e .`, as scripts/demo.sh and scripts/test.sh do)."""
from phi3skip.commands.export import main

main()
