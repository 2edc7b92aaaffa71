"""`python scripts/convert_gguf.py ARGS` is `phi3skip-convert-gguf ARGS`: phi3skip/commands/convert_gguf.py.
Needs the project installed (`pip install -e .`, as scripts/demo.sh and scripts/test.sh do)."""
from phi3skip.commands.convert_gguf import main

main()
