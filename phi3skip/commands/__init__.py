"""The user commands, each a module with `run(argv)` (raises UserError) and `main(argv)` (one-line errors, exit 2).

    phi3skip-generate      python scripts/generate.py      text with layers skipped, or self-speculative
    phi3skip-evaluate      python scripts/evaluate.py      perplexity and speed per skip set
    phi3skip-export        python scripts/export.py        a skip set as a checkpoint and/or a GGUF for other engines
    phi3skip-convert-gguf  python scripts/convert_gguf.py  a GGUF as a Phi-3 checkpoint folder
    phi3skip-rank-layers   python scripts/rank_layers.py   per-layer importance and the greedy skip order
    phi3skip-random-model  python scripts/random_model.py  a small random model (smoke tests, demo --tiny)
    phi3skip-check-gguf    python scripts/check_gguf.py    an exported GGUF run in llama.cpp beside the student

prepare.py and train.py stay at the top of the repository: the data and training steps, read as scripts.
"""
