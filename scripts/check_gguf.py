"""`python scripts/check_gguf.py ARGS` is `phi3skip-check-gguf ARGS`: phi3skip/commands/check_gguf.py.
Needs the project installed (`pip install -e ".[llama]"`, as scripts/demo.sh does)."""
from phi3skip.commands.check_gguf import main

main()
