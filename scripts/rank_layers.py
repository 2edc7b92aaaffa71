"""`python scripts/rank_layers.py ARGS` is `phi3skip-rank-layers ARGS`: phi3skip/commands/rank_layers.py.
Needs the project installed (`pip install -e .`, as scripts/demo.sh and scripts/test.sh do)."""
from phi3skip.commands.rank_layers import main

main()
