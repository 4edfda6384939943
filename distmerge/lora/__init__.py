"""LoRA adapters as merge inputs (``model: MODEL+ADAPTER``): opening them and reading their rows."""

from distmerge.lora.adapter import LoraCheckpoint, LoraTensorInfo, open_model, split_reference
from distmerge.lora.rows import read_adapted_rows, read_source_rows

__all__ = ["LoraCheckpoint", "LoraTensorInfo", "open_model", "read_adapted_rows", "read_source_rows",
           "split_reference"]
