"""`python scripts/generate.py ARGS` is `phi3skip-generate ARGS`: phi3skip/commands/generate.py.
Needs the project installed (`pip install -e .`, as scripts/demo.sh and scripts/test.sh do)."""
from phi3skip.commands.generate import main

main()
