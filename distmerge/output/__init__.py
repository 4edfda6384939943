"""The output directory's life: where it may be, who may write it, what proves it intact.

- :mod:`~distmerge.output.location`: an output is never an input, inside one or around one;
- :mod:`~distmerge.output.lock`: one run per output directory at a time;
- :mod:`~distmerge.output.ownership`: what a run may delete (only what distmerge wrote);
- :mod:`~distmerge.output.manifest`: checksums the output carries, so ``verify`` needs nothing else.
"""
