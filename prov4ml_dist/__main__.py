"""``python -m prov4ml_dist`` is the ``prov4ml-dist`` command."""

from .cli import main

raise SystemExit(main())
