"""`python scripts/evaluate.py ARGS` is `phi3skip-evaluate ARGS`: phi3skip/commands/evaluate.py.
Needs the project installed (`pip install -e .`, as scripts/demo.sh and scripts/test.sh do)."""
from phi3skip.commands.evaluate import main

main()
