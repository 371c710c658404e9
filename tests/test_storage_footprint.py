"""Footprint (issue 14): small runs are small on disk, and merged.h5's rows are compressed with
filters every HDF5 reader has, reading back exactly what was logged."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

import prov4ml_dist as prov4ml


def _run(tmp_path: Path, values: np.ndarray) -> Path:
    run_dir = Path(prov4ml.start_run(experiment_name="disk", provenance_save_dir=tmp_path, run_id="r",
                                     sample_interval=None))
    for step, value in enumerate(values.tolist()):
        prov4ml.log_metric("loss", value, prov4ml.Context.TRAINING, step=step)
    prov4ml.end_run()
    return run_dir


def test_a_200_point_single_rank_run_takes_at_most_200_kb(tmp_path):
    """Shard, merged.h5 and prov.json of 200 points: a shard used to be ~1 MB of mostly empty chunks."""
    run_dir = _run(tmp_path, np.linspace(1.0, 0.1, 200))
    sizes = {p.relative_to(run_dir).as_posix(): p.stat().st_size for p in run_dir.rglob("*") if p.is_file()}
    assert sum(sizes.values()) <= 200_000, sizes
    assert not [name for name in sizes if name.endswith((".ring", ".wal"))]  # removed at the clean close


def test_merged_rows_are_shuffle_deflate_in_chunks_no_larger_than_the_data(tmp_path):
    """Plain h5py reads them back bit for bit (a random walk: values that do not compress away)."""
    values = np.random.default_rng(14).standard_normal(5000).cumsum()
    run_dir = _run(tmp_path, values)
    with h5py.File(run_dir / "merged.h5", "r") as f:
        rows = f["metrics/rows"]
        assert rows.compression == "gzip" and rows.shuffle and rows.chunks[0] <= len(values)
        assert rows.id.get_storage_size() < 0.5 * rows.size * rows.dtype.itemsize
        data = rows[()]
    np.testing.assert_array_equal(data["value"], values)
    np.testing.assert_array_equal(data["step"], np.arange(len(values)))
