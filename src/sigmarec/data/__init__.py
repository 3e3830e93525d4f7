"""Stage 1 - data: load a source into the common schema, validate, filter, split, write."""
