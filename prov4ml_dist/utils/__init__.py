"""yProv4ML's ``utils`` import path: ``from prov4ml_dist.utils import getters``."""
