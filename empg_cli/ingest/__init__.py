"""Ingest: what trainers write (verl, TRL, prime-rl, ART, rLLM, AReaL, generic tables) as empg rollouts.

One module per trainer reads its layout field by field (`empg convert`); `batches` turns a trainer's in-memory
batch into rollouts rows with exact token ids, for trainers that log from memory.
"""

from .batches import verl_agent_loop_table, verl_agent_table, verl_batch_table, write_rollouts
from .convert import ConvertSummary, convert, convert_file

__all__ = ["ConvertSummary", "convert", "convert_file", "verl_agent_loop_table", "verl_agent_table",
           "verl_batch_table", "write_rollouts"]
