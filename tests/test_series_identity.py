"""Which series a point lands in, and what a call records: the stored names decide, never
Python's equality (``"train" == Phase.TRAIN`` for a StrEnum, IntEnum members of two classes
with equal values); ``log_metrics`` is all or nothing; Enum params are stored by name."""

from __future__ import annotations

import math
from enum import Enum, IntEnum, StrEnum, auto

import pytest

import prov4ml_dist as prov4ml
from prov4ml_dist import api
from prov4ml_dist.errors import InvalidInputError
from prov4ml_dist.run import INT64_MAX
from prov4ml_dist.shard import ShardReader


class Phase(StrEnum):
    TRAIN = auto()  # value "train", stored name "TRAIN"


class PA(IntEnum):
    EVAL = 1


class PB(IntEnum):
    TEST = 1


class Plain(Enum):
    ADAM = "adam"


def _stored() -> tuple[dict[tuple[str, str, str], list[tuple[int, float]]], dict[str, object]]:
    """Close the active run; its shard's points per (key, context, source) and its params."""
    run = api.get_active_run()
    run.close()
    api._active = None
    with ShardReader(run.shard_path) as reader:
        series = reader.series("metrics")
        points: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
        for row in reader.read_table("metrics"):
            s = series[int(row["series"])]
            points.setdefault((s["key"], s["context"], s["source"] or ""), []).append(
                (int(row["step"]), float(row["value"])))
        params = {r["key"]: r["value"] for r in reader.records("param")}
    return points, params


@pytest.mark.parametrize("first", ["string", "enum"])
def test_a_str_enum_and_its_value_are_the_series_their_names_say(run_dir, first):
    """"train" is series "train", Phase.TRAIN series "TRAIN", whichever comes first; each has
    its own step=None counter, and "TRAIN" as a string shares Phase.TRAIN's."""
    order = ["train", Phase.TRAIN] if first == "string" else [Phase.TRAIN, "train"]
    for context in order:
        prov4ml.log_metric("loss", 1.0 if context is Phase.TRAIN else 2.0, context, step=0)
    for context in (*order, "TRAIN", Phase.TRAIN, "train"):
        prov4ml.log_metric("n", 0.0, context)
    points, _ = _stored()
    assert points[("loss", "TRAIN", "")] == [(0, 1.0)] and points[("loss", "train", "")] == [(0, 2.0)]
    assert [s for s, _ in points[("n", "TRAIN", "")]] == [0, 1, 2]
    assert [s for s, _ in points[("n", "train", "")]] == [0, 1]


def test_int_enums_of_two_classes_with_equal_values_are_two_series(run_dir):
    prov4ml.log_metric("acc", 0.5, PA.EVAL, step=3)
    prov4ml.log_metric("acc", 0.7, PB.TEST, step=3)
    prov4ml.log_metric("acc", 0.1, PA.EVAL)
    prov4ml.log_metric("acc", 0.2, PB.TEST)
    prov4ml.log_metric("flops", 1.0, "x", source=PA.EVAL)
    prov4ml.log_metric("flops", 2.0, "x", source=PB.TEST)
    points, _ = _stored()
    assert points[("acc", "EVAL", "")] == [(3, 0.5), (4, 0.1)]
    assert points[("acc", "TEST", "")] == [(3, 0.7), (4, 0.2)]
    assert points[("flops", "x", "EVAL")] == [(0, 1.0)] and points[("flops", "x", "TEST")] == [(0, 2.0)]


@pytest.mark.parametrize("bad", [{"b": "2.0"}, {"b": [1.0, 2.0]}, {5: 1.0}, {"": 1.0}])
def test_a_refused_log_metrics_call_records_nothing(run_dir, bad):
    """All or nothing: one bad item (value or key, wherever it is) and no item is logged, no
    series declared, no step=None counter moved."""
    prov4ml.log_metric("a", 0.0, "ctx")
    with pytest.raises(InvalidInputError):
        prov4ml.log_metrics({"a": 1.0, "new": 1.0, **bad}, "ctx")
    prov4ml.log_metrics({"a": 2.0}, "ctx")
    points, _ = _stored()
    assert points == {("a", "ctx", ""): [(0, 0.0), (1, 2.0)]}


def test_log_metrics_refuses_a_call_whose_automatic_step_overflows_for_one_key(run_dir):
    prov4ml.log_metric("late", 0.0, "ctx", step=INT64_MAX)
    with pytest.raises(InvalidInputError, match="does not fit in 64 bits"):
        prov4ml.log_metrics({"early": 1.0, "late": 1.0}, "ctx")
    points, _ = _stored()
    assert points == {("late", "ctx", ""): [(INT64_MAX, 0.0)]}


def test_enum_params_are_stored_by_name_whatever_their_value_type(run_dir):
    """Like contexts: a StrEnum or IntEnum param is its member's name, not its value."""
    prov4ml.log_params({"phase": Phase.TRAIN, "eval": PA.EVAL, "opt": Plain.ADAM, "ctx": prov4ml.Context.TESTING,
                        "nested": [PB.TEST, {"k": Phase.TRAIN}], "nan": math.nan})
    _, params = _stored()
    assert params == {"phase": "TRAIN", "eval": "EVAL", "opt": "ADAM", "ctx": "TESTING",
                      "nested": ["TEST", {"k": "TRAIN"}], "nan": "nan"}


def test_a_refused_log_params_call_records_nothing(run_dir):
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    for bad in ({"": 1}, {"x": deep}):
        with pytest.raises(InvalidInputError):
            prov4ml.log_params({"lr": 0.1, **bad})
    prov4ml.log_params({"seed": 1})
    _, params = _stored()
    assert params == {"seed": 1}
