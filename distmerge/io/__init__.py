"""Every byte distmerge reads from a place it does not own goes through this package.

Inputs come from strangers (model folders downloaded from a hub, shared volumes other people
write), so each read here is bounded and typed before it happens: special files (FIFOs,
devices, sockets) are refused by type before they can block a reader, links that leave a model
folder are refused before anything is read through them, and structured text (JSON, YAML) is
bounded in size and nesting before anything is built from it.
"""
