"""The library side of the study "does localization inform editing?" (`recipes/study_sites.py` is its CLI): the
hash split of facts, the edit-site policies, the keyed row store, the summary statistics and their report."""

from locedit.study.correlation import paired_by_layer_band, within_fact_correlation
from locedit.study.policies import (FIXED_POLICIES, HELD_OUT_POLICIES, best_row, choose_fixed, layer_bands,
                                    located_layer, policy_key, random_heads, random_layer)
from locedit.study.rows import chain_complete, latest_chains, read_rows, rows_store, sequential_key
from locedit.study.split import fact_hash, sequential_chain, split_facts, stratified_subset
from locedit.study.summary import markdown, regression_line, summarize

__all__ = ["FIXED_POLICIES", "HELD_OUT_POLICIES", "best_row", "chain_complete", "choose_fixed", "fact_hash",
           "latest_chains", "layer_bands", "located_layer", "markdown", "paired_by_layer_band", "policy_key",
           "random_heads", "random_layer", "read_rows", "regression_line", "rows_store", "sequential_chain",
           "sequential_key", "split_facts", "stratified_subset", "summarize", "within_fact_correlation"]
