"""Footprint (issue 14): small runs are small on disk, and merged.h5's rows are compressed with
filters every HDF5 reader has, reading back exactly what was logged."""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from isal import isal_zlib

import prov4ml_dist as prov4ml
from prov4ml_dist.merge import compress, layout
from prov4ml_dist.merge.prune import remove_merged_shards

from .conftest import BIN, child_env


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


@pytest.mark.parametrize("backend", ["isal", "zlib"])
def test_merged_rows_deflated_by_isal_or_zlib_read_back_alike_with_plain_h5py(tmp_path, monkeypatch, backend):
    """The merge deflates with ISA-L where it is installed (a dependency where it has wheels:
    here it must be) and with zlib otherwise: either way plain h5py reads HDF5's standard
    shuffle + deflate back bit for bit, over several chunks and a partial last one."""
    assert compress.DEFLATE_BACKEND == "isal"  # pyproject installs it on this platform
    monkeypatch.setattr(compress, "_deflate", {"isal": isal_zlib, "zlib": zlib}[backend])
    monkeypatch.setattr(layout, "ROWS_CHUNK_ROWS", 1000)
    rows = np.zeros(2500, dtype=layout.ROW_DTYPE)
    rows["step"] = np.arange(2500)
    rows["value"] = np.random.default_rng(14).standard_normal(2500).cumsum()
    with h5py.File(tmp_path / "stage.h5", "w") as stage, h5py.File(tmp_path / "out.h5", "w") as out:
        compress.write_compressed(out, "rows", stage.create_dataset("rows", data=rows))
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert f["rows"].compression == "gzip" and f["rows"].shuffle and f["rows"].chunks == (1000,)
        np.testing.assert_array_equal(f["rows"][()], rows)


def test_remove_shards_is_off_by_default_and_removes_only_verified_shards(tmp_path):
    """``prov4ml-dist merge --remove-shards`` removes a shard whose sha256 merged.h5 records;
    without it nothing goes; a shard changed after the merge is kept."""
    run_dir = _run(tmp_path, np.arange(50.0))
    shard = run_dir / "shards" / "rank-00000.h5"
    plain = subprocess.run([str(BIN / "prov4ml-dist"), "merge", str(run_dir)], capture_output=True, text=True,
                           timeout=300, env=child_env())
    assert plain.returncode == 0 and shard.exists(), plain.stderr
    with shard.open("ab") as f:
        f.write(b"\0")  # changed since merged.h5 recorded its sha256
    assert remove_merged_shards(run_dir, run_dir / "merged.h5") == ([], ["rank-00000.h5: kept, its sha256 is not "
                                                                         "the one merged.h5 recorded"])
    pruned = subprocess.run([str(BIN / "prov4ml-dist"), "merge", str(run_dir), "--remove-shards"],
                            capture_output=True, text=True, timeout=300, env=child_env())
    assert pruned.returncode == 0 and "1 shard(s) removed" in pruned.stdout, pruned.stderr
    assert not shard.exists()
    with h5py.File(run_dir / "merged.h5", "r") as f:
        np.testing.assert_array_equal(f["metrics/rows"]["value"], np.arange(50.0))
