"""What ``end_run`` writes on rank 0 after the merge for yProv4ML's ``create_card`` and
``crate_ro_crate``. A failure here is reported, never raised: the run is already merged."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def write_outputs(run_dir: Path, card: bool, crate: bool) -> None:
    """The card first, so that the crate lists it."""
    if card:
        try:
            from .card import write_card

            write_card(run_dir)
        except Exception as exc:  # noqa: BLE001 - reported; the merged run stays intact
            log.warning("end_run(create_card=True): no model card written: %s", exc)
    if crate:
        try:
            from .crate import write_crate

            write_crate(run_dir)
        except Exception as exc:  # noqa: BLE001
            log.warning("end_run(crate_ro_crate=True): no RO-Crate written: %s", exc)
