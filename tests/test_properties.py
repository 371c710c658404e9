"""Property-based tests of the public API over arbitrary keys, values, contexts, steps, names
and paths: every call either succeeds, and then what it recorded comes back unchanged through
shard → merge → ``merged.h5``, or raises a ``Prov4MLError`` (``TypeError`` only for an
unknown keyword). Each test drives one run with two sets of examples, valid arguments (which
must be accepted) and anything at all, and checks the round trip once at the end.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import itertools
import json
import operator
import time
from collections.abc import Callable
from enum import Enum
from fractions import Fraction
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prov4ml_dist as prov4ml
from prov4ml_dist import api
from prov4ml_dist.errors import Prov4MLError
from prov4ml_dist.run import as_param_value
from prov4ml_dist.shard import drain

from .faultkit import merged_points

SETTINGS = settings(max_examples=75, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Phase(Enum):
    WARMUP = 1
    TRAINING = 2  # the same stored name as Context.TRAINING: one series, one step count


PRINTABLE = st.text(st.characters(blacklist_categories=("C", "Z")) | st.just(" "), min_size=1, max_size=12)
VALID_NAMES = PRINTABLE | st.sampled_from(["loss", "a/b", "../x", "..", "/etc/passwd", "C:\\x", "𝔁", "a" * 1024])
NAMES = st.one_of(VALID_NAMES, st.text(max_size=12), st.sampled_from(["a\nb", "tab\there", "\x00", "", "a" * 1025]),
                  st.integers(), st.none(), st.binary(max_size=3), st.lists(st.text(max_size=2), max_size=1))
VALID_CONTEXTS = st.sampled_from([*prov4ml.Context, *Phase, prov4ml.LoggingItemKind.METRIC]) | PRINTABLE
CONTEXTS = st.one_of(VALID_CONTEXTS, st.text(max_size=8), st.integers(), st.none())


def exercise(call: Callable[..., Any], valid: dict[str, st.SearchStrategy],
             anything: dict[str, st.SearchStrategy]) -> None:
    """``call`` over ``valid`` arguments (each must be accepted), then over ``anything``
    (accepted, or refused with a Prov4MLError: any other exception fails the test)."""

    @SETTINGS
    @given(**valid)
    def accepted(**kwargs: Any) -> None:
        call(**kwargs)

    @SETTINGS
    @given(**anything)
    def accepted_or_refused(**kwargs: Any) -> None:
        try:
            call(**kwargs)
        except Prov4MLError:
            pass

    accepted()
    accepted_or_refused()


@pytest.fixture
def run_dir(tmp_path):
    path = prov4ml.start_run(experiment_name="props", provenance_save_dir=tmp_path, run_id="p",
                             sample_interval=None, flush_interval=0.05)
    yield path


# -- metrics ---------------------------------------------------------------------------------
VALID_VALUES = st.one_of(
    st.floats(), st.integers(min_value=-(2**1000), max_value=2**1000), st.booleans(), st.fractions(),
    st.floats(width=32).map(np.float32), st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.floats().map(lambda x: np.array([x])))
VALUES = st.one_of(VALID_VALUES, st.integers(min_value=-(2**1100), max_value=2**1100), st.none(),
                   st.text(max_size=3), st.complex_numbers(max_magnitude=1e3), st.decimals(),
                   st.lists(st.floats(), min_size=0, max_size=3).map(np.array), st.lists(st.floats(), max_size=2))
VALID_STEPS = (st.none() | st.integers(-(2**63), 2**63 - 1) | st.integers(-(2**63), 2**63 - 1).map(np.int64)
               | st.just(2**63 - 1))  # then step=None: the automatic step would not fit
STEPS = st.one_of(VALID_STEPS, st.integers(min_value=-(2**64), max_value=2**64), st.floats(), st.booleans(),
                  st.text(max_size=2))


def test_log_metric_records_exactly_what_it_accepts(run_dir):
    expected: dict[tuple[str, str], list[tuple[int, float]]] = {}
    next_step: dict[tuple[str, str], int] = {}

    def log(key: Any, value: Any, context: Any, step: Any) -> None:
        named = prov4ml.Context.TRAINING if context is None else context  # no context: TRAINING (yProv4ML 3.x)
        series = (key, named.name if isinstance(named, Enum) else named)
        try:
            prov4ml.log_metric(key, value, context, step=step)
        except Prov4MLError as exc:  # after step 2**63 - 1, the automatic step does not fit
            if step is None and "automatic step" in str(exc) and next_step[series] > 2**63 - 1:
                return
            raise
        stored = next_step.get(series, 0) if step is None else operator.index(step)
        next_step[series] = stored + 1
        expected.setdefault(series, []).append((stored, float(value.item() if hasattr(value, "item") else value)))

    exercise(log, {"key": VALID_NAMES, "value": VALID_VALUES, "context": VALID_CONTEXTS, "step": VALID_STEPS},
             {"key": NAMES, "value": VALUES, "context": CONTEXTS, "step": STEPS})
    prov4ml.end_run()
    got = {(k, c): points for (k, c, _), points in merged_points(run_dir / "merged.h5").items()}
    assert got.keys() == expected.keys()  # a refused call declared no series
    for series, points in expected.items():
        np.testing.assert_array_equal(np.array(got[series]), np.array(points), err_msg=str(series))  # NaN == NaN


def test_numbers_in_disguise_are_stored_as_floats(run_dir):
    """The conversions the property above relies on, spelled out once."""
    for value in (True, Fraction(1, 3), np.float32(0.1), np.array([2.5]), 10**300, np.int64(-7)):
        prov4ml.log_metric("disguised", value, prov4ml.Context.TESTING)
    prov4ml.end_run()
    points = merged_points(run_dir / "merged.h5")[("disguised", "TESTING", 0)]
    assert points == list(enumerate([1.0, 1 / 3, float(np.float32(0.1)), 2.5, 1e300, -7.0]))


# -- params ----------------------------------------------------------------------------------
PARAM_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
              st.text(max_size=5), st.sampled_from([*Phase, Path("/x/y")]), st.floats().map(np.float64),
              st.builds(object), st.complex_numbers(max_magnitude=1), st.binary(max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), inner, max_size=3)),
    max_leaves=8)


def _as_stored(value: Any) -> Any:
    """A JSON value as the merge stores it: HDF5 strings cannot hold NUL, which becomes U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_as_stored(v) for v in value]
    if isinstance(value, dict):
        return {_as_stored(k): _as_stored(v) for k, v in value.items()}
    return value


def test_log_param_records_exactly_what_it_accepts(run_dir):
    expected: dict[str, Any] = {}

    def log(key: Any, value: Any) -> None:
        prov4ml.log_param(key, value)
        expected[key] = _as_stored(json.loads(json.dumps(as_param_value(value))))  # the last value wins

    exercise(log, {"key": VALID_NAMES, "value": PARAM_VALUES}, {"key": NAMES, "value": PARAM_VALUES})
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    looped: list = []
    looped.append(looped)
    for value in (nested, looped):
        with pytest.raises(Prov4MLError):
            prov4ml.log_param("deep", value)
    prov4ml.end_run()
    with h5py.File(run_dir / "merged.h5", "r") as f:
        got = {row["key"].decode(): json.loads(row["value"]) for row in f["params"][()]}
    assert got == expected  # NaN and ±inf are stored as their repr, so plain equality holds


# -- artifacts -------------------------------------------------------------------------------
SEGMENT = st.text(st.sampled_from("abcXYZ019_-."), min_size=1, max_size=6)
# Directories end in "_d" and files in ".f", so a valid name never collides with an earlier one.
VALID_ARTIFACT_NAMES = st.builds(lambda dirs, name: "/".join([*(d + "_d" for d in dirs), name + ".f"]),
                                 st.lists(SEGMENT, max_size=2), SEGMENT)
VALID_ARTIFACT_VALUES = st.one_of(
    st.binary(max_size=64), st.lists(st.integers(-9, 9), max_size=6).map(np.array),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4)
                 | st.floats(allow_nan=False, allow_infinity=False),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=6).filter(lambda value: not isinstance(value, (str, type(None)))))  # a str names a file
ARTIFACT_VALUES = st.one_of(VALID_ARTIFACT_VALUES, st.floats(), st.builds(object), st.sets(st.integers()))


def _serialised(value: object) -> bytes:
    """What the artifact store writes for an in-memory value (README: bytes, .npy, JSON)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    return json.dumps(value, allow_nan=False, sort_keys=True).encode()


def test_log_artifact_stores_exactly_what_it_accepts_inside_the_artifact_directory(run_dir):
    run = prov4ml.get_active_run()
    store = run.artifacts.directory.resolve()
    stored: list[tuple[Path, str, bytes]] = []

    def log(name: Any, value: Any, context: Any) -> None:
        record = prov4ml.log_artifact(name, value, context)
        path = run.rank_root / record["path"]
        assert store in path.resolve().parents
        data = _serialised(value)
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["size"] == len(data)
        stored.append((path, record["sha256"], data))

    exercise(log, {"name": VALID_ARTIFACT_NAMES, "value": VALID_ARTIFACT_VALUES, "context": VALID_CONTEXTS},
             {"name": NAMES | VALID_ARTIFACT_NAMES, "value": ARTIFACT_VALUES, "context": CONTEXTS})
    prov4ml.end_run()
    for path, _, data in stored:
        assert path.read_bytes() == data
    with h5py.File(run_dir / "merged.h5", "r") as f:
        merged = {row["sha256"].decode() for row in f["artifacts/content"][()]}
    assert {sha for _, sha, _ in stored} <= merged


# -- start_run -------------------------------------------------------------------------------
VALID_COMPONENTS = PRINTABLE.filter(lambda name: "/" not in name and "\\" not in name and name not in (".", ".."))
VALID_SECONDS = st.floats(min_value=0.01, max_value=1000)
SECONDS = st.one_of(VALID_SECONDS, st.floats(), st.integers(-5, 10), st.none(), st.text(max_size=2), st.booleans())


def test_start_run_makes_its_directory_inside_the_save_directory_or_refuses(tmp_path, monkeypatch):
    """Any experiment name, run id and intervals: a run whose directory is inside the save
    directory, or a refusal that leaves no shard behind (a retry must not find one). Hundreds
    of runs: without a drain process each (``test_drain_process.py`` tests those)."""
    monkeypatch.setenv(drain.ENV, "off")
    save = (tmp_path / "save").resolve()
    fresh = itertools.count()

    def start(experiment: Any, run_id: Any, flush: Any, sample: Any, merge: Any, unique: bool = False) -> None:
        if unique:  # a run id used before is refused, rightly: valid examples never repeat one
            run_id = f"{run_id}.{next(fresh)}"
        before = sorted(save.rglob("*.h5"))
        try:
            run_dir = prov4ml.start_run(experiment_name=experiment, provenance_save_dir=save, run_id=run_id,
                                        flush_interval=flush, sample_interval=sample, merge_timeout=merge)
        except Prov4MLError:
            assert sorted(save.rglob("*.h5")) == before
            raise
        try:
            assert save in run_dir.resolve().parents
            assert (run_dir / "shards" / "rank-00000.h5").is_file()
        finally:
            api.get_active_run().close()
            api._active = None
            api._hooks.remove()
            api._hooks = None

    exercise(start, {"experiment": VALID_COMPONENTS, "run_id": VALID_COMPONENTS, "flush": VALID_SECONDS,
                     "sample": st.none(), "merge": VALID_SECONDS, "unique": st.just(True)},
             {"experiment": NAMES, "run_id": NAMES, "flush": SECONDS, "sample": SECONDS, "merge": SECONDS})


@SETTINGS
@given(name=st.text(min_size=1, max_size=12).filter(str.isidentifier))
def test_an_unknown_keyword_is_a_type_error(tmp_path_factory, name):
    if name in {*inspect.signature(prov4ml.start_run).parameters, *api.YPROV4ML_OPTIONS}:
        return
    with pytest.raises(TypeError):
        prov4ml.start_run(experiment_name="kw", provenance_save_dir=tmp_path_factory.getbasetemp(),
                          sample_interval=None, **{name: 1})
    assert prov4ml.get_active_run() is None
    with pytest.raises(TypeError):
        prov4ml.log_metric("k", 1.0, prov4ml.Context.TRAINING, **{name: 1})


def test_a_name_logged_at_every_step_costs_the_same_each_time(run_dir):
    """Each copy of a name gets the next number (config.1.json, ...): found in one step, not by
    trying every earlier number (3,000 copies took 33 s that way, found by the test above)."""
    took = []
    for _ in range(2000):
        started = time.perf_counter()
        prov4ml.log_artifact("ckpt.bin", b"x", prov4ml.Context.TRAINING)
        took.append(time.perf_counter() - started)
    assert sum(took[-400:]) < 4 * sum(took[:400])
    assert prov4ml.log_artifact("ckpt.bin", b"x", prov4ml.Context.TRAINING)["path"].endswith("ckpt.2000.bin")
