"""The output directory's life: where it may be, who may write it, what proves it intact.

- :mod:`~distmerge.output.location`: an output is never an input, inside one or around one;
- :mod:`~distmerge.output.lock`: one run per output directory at a time;
- :mod:`~distmerge.output.directory`: what an existing OUT holds (fresh, resumable, complete);
- :mod:`~distmerge.output.ownership`: what a run may delete (only what distmerge wrote);
- :mod:`~distmerge.output.journal`: what is done, with checksums, so a crash costs only unfinished work;
- :mod:`~distmerge.output.side_files`: config.json, tokenizer and generation files beside the weights;
- :mod:`~distmerge.output.manifest`: checksums the output carries, so ``verify`` needs nothing else;
- :mod:`~distmerge.output.verify`: ``distmerge verify``, also run by the merge before the index;
- :mod:`~distmerge.output.report`: ``merge_report.json`` and the model card.

Bytes themselves are read and written by :mod:`distmerge.io`.
"""
