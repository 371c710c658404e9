"""yProv4ML 2.x / 3.x argument forms, mapped onto ours in one place so ``api.py`` stays short.

yProv4ML changed positional orders between versions (``start_run``'s first argument,
``log_artifact(name, path, context, source, step)``, ``log_model(name, model, context, source,
...)``); each form is recognised by position and type, never guessed from a value's content
alone where two readings are possible.
"""

from __future__ import annotations

from typing import Any

# start_run(experiment_name, prov_user_namespace, provenance_save_dir, <these>) in yProv4ML 3.x
START_RUN_POSITIONAL = ("collect_all_processes", "save_after_n_logs", "rank", "disable_codecarbon",
                        "metrics_file_type", "csv_separator", "use_compressor")
# log_model(model_name, model, <these>) in yProv4ML 3.x; (model, model_name, <ours>) here
LOG_MODEL_3X = ("context", "source", "log_model_info", "log_model_layers", "log_as_artifact", "is_input")
LOG_MODEL_OURS = ("log_model_info", "log_model_layers", "log_as_artifact")


def looks_like_namespace(value: object) -> bool:
    """An IRI-like string (``http://...``, ``www.example.org``): never an experiment name, which is one
    directory level."""
    return isinstance(value, str) and ("://" in value or value.startswith("www."))


def start_run_names(first: Any, second: Any) -> tuple[Any, Any]:
    """(experiment_name, prov_user_namespace) from start_run's first two arguments: 3.x puts the
    experiment first; a 2.x call (namespace first, an IRI) is recognised and swapped."""
    if second is not None and looks_like_namespace(first) and not looks_like_namespace(second):
        return second, first
    return first, second


def bind_positional(func: str, names: tuple[str, ...], args: tuple[Any, ...], given: dict[str, Any]) -> dict[str, Any]:
    """Extra positional ``args`` bound to ``names`` in order, merged into keywords ``given``
    (None = not given). Too many, or one given twice, is a TypeError as Python would raise."""
    if len(args) > len(names):
        raise TypeError(f"{func}() got {len(args)} extra positional arguments; at most {len(names)}: "
                        f"{', '.join(names)}")
    bound = dict(given)
    for name, value in zip(names, args, strict=False):
        if bound.get(name) is not None:
            raise TypeError(f"{func}() got multiple values for argument {name!r}")
        bound[name] = value
    return bound


def artifact_3x(step: Any, timestamp: Any, source: Any) -> tuple[Any, Any, Any]:
    """(step, timestamp, source): 3.x's ``log_artifact(name, path, context, source, step)`` puts a
    string where our ``step`` is; then the next argument is the step."""
    if isinstance(step, str) and source is None:
        return timestamp, None, step
    return step, timestamp, source
