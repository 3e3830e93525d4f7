"""Generative-retrieval baselines of SIGMA's comparison: GR(SID) (TIGER/LC-Rec: items as full
semantic-ID tokens, constrained beam search) and GR(ID) (one vocabulary token per item), on
SIGMA's backbone, prompts, data and training budget.

Modules: :mod:`~sigmarec.gr.config` (the ``gr`` config section), :mod:`~sigmarec.gr.items` (item
token schemes), :mod:`~sigmarec.gr.model` (the model and collator), :mod:`~sigmarec.gr.decoding`
(the trie constraint and ``gr_recommend``, the generation entry point for speed benchmarks) and
:mod:`~sigmarec.gr.stage` (the ``gr_baselines`` stage). Only the config is imported here: the root
config imports this package, and the CLI must stay fast to start.
"""

from sigmarec.gr.config import GRConfig

__all__ = ["GRConfig"]
