"""AIM quality experiment: does Activation-Informed Merging help on models with learned differences?

A tiny byte-level Llama is pretrained on the standard library's docstrings, three experts are
fine-tuned on synthetic skills, and every pair and the triple is merged by distmerge with and
without AIM and with a uniform-shrink control. ``python -m benchmarks.quality.run`` runs it all.
"""
