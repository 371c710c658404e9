"""yProv4ML's logger classes, at its import paths (``prov4ml_dist.loggers.prov4ml_itwinai_logger``)."""
