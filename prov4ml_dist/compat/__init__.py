"""yProv4ML's names that are not part of the core: extra logging functions (functions.py),
option enums (enums.py), the sample-index check (indices.py), and what end_run writes on
request — a model card (card.py) and an RO-Crate (crate.py). Kept apart so the core stays
small; ``prov4ml_dist`` re-exports the public names."""
