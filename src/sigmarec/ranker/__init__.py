"""The ``ranker`` stage: ``features_ltr``, a LightGBM LambdaRank peer over the copy prior's
evidence (purchase counts, recency, text match, rarity, novelty, popularity, SASRec and
co-occurrence scores, the task), trained on the training window's task samples."""
