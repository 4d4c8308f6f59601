"""The scaling comparisons, one module each; run them with `efficient-attn experiment NAME --workdir DIR`.

See efficient_attn/experiment.py for what a module defines and experiments/README.md for
the questions, the anchors and the results measured here.
"""
