"""Stage 2 - baselines: classical recommenders, and the SASRec ID tower later stages reuse."""
