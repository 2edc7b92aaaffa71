"""`python scripts/random_model.py ARGS` is `phi3skip-random-model ARGS`: phi3skip/commands/random_model.py.
Needs the project installed (`pip install -e .`, as scripts/demo.sh and scripts/test.sh do)."""
from phi3skip.commands.random_model import main

main()
