"""Framework integrations, one module per framework (see DESIGN.md here). Importing
``prov4ml_dist`` imports none of them; each imports its framework when it is imported."""
