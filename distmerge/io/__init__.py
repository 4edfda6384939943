"""Every byte distmerge reads or writes goes through this package.

- :mod:`~distmerge.io.storage`: the interface of byte spans (ranged reads into the caller's
  buffer, writes at offsets, checksums, publishing a finished file) and :func:`storage_for`,
  where remote storage (``s3://``, ``gs://``, the Hugging Face Hub) will plug in;
  :mod:`~distmerge.io.local` is the local implementation.
- :mod:`~distmerge.io.safetensors`: the file format: headers read and written, row spans,
  ``read_rows``/``write_rows``, the index file.
- :mod:`~distmerge.io.scan`: NaN/Inf counting (worker input checks and ``verify``).
- :mod:`~distmerge.io.writes`: output files created at size and published, small files atomically.
- :mod:`~distmerge.io.files` and :mod:`~distmerge.io.structured`: inputs opened safely, bounded JSON/YAML.

Inputs come from strangers (model folders downloaded from a hub, shared volumes other people
write), so each read here is bounded and typed before it happens: special files (FIFOs,
devices, sockets) are refused by type before they can block a reader, links that leave a model
folder are refused before anything is read through them, and structured text (JSON, YAML) is
bounded in size and nesting before anything is built from it.
"""
