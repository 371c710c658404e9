"""prov4ml_dist: provenance of distributed ML training — yProv4ML's API, one HDF5 shard per
rank, a rank-0 merge, and a W3C PROV-JSON with one agent per rank.

    import prov4ml_dist as prov4ml      # or: import prov4ml_dist as yprov4ml
"""

import importlib
import importlib.util
from typing import Any

from .api import (
    end_run,
    get_active_run,
    log_artifact,
    log_dataset,
    log_metric,
    log_metrics,
    log_model,
    log_param,
    log_params,
    save_model_version,
    start_run,
)
from .compat.enums import CompressorType, FoldOperation, MetricsType
from .compat.functions import (
    create_context,
    get_artifacts_dir,
    get_run_dir,
    log_carbon_metrics,
    log_context,
    log_current_execution_time,
    log_execution_command,
    log_flops_per_batch,
    log_flops_per_epoch,
    log_provenance_documents,
    log_source_code,
    log_system_metrics,
)
from .context import Context, Contexts, LoggingItemKind
from .errors import (
    ArtifactError,
    InvalidInputError,
    MergeError,
    ModelSaveError,
    Prov4MLError,
    RunStateError,
    ShardError,
)

__version__ = "0.1.0"

# yProv4ML's wrappers (they need torch) and logger: imported on first use, so that `import prov4ml_dist`
# stays cheap.
_LAZY = {
    "ProvenanceTrackedFunction": "prov4ml_dist.wrappers.tracked_function",
    "ProvenanceTrackedModel": "prov4ml_dist.wrappers.tracked_model",
    "WeightDistributionTrackedModel": "prov4ml_dist.wrappers.tracked_layers",
    "IndexedDatasetWrapper": "prov4ml_dist.wrappers.indexed_dataset",
    "ProvMLItwinAILogger": "prov4ml_dist.loggers.prov4ml_itwinai_logger",
    "ProvMLLogger": "prov4ml_dist.integrations.lightning",  # imports lightning: not in __all__
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prov4ml_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ArtifactError", "CompressorType", "Context", "Contexts", "FoldOperation", "IndexedDatasetWrapper",
    "InvalidInputError", "LoggingItemKind", "MergeError", "MetricsType", "ModelSaveError", "Prov4MLError",
    "ProvMLItwinAILogger", "ProvenanceTrackedFunction", "ProvenanceTrackedModel", "RunStateError", "ShardError",
    "WeightDistributionTrackedModel", "create_context", "end_run", "get_active_run", "get_artifacts_dir",
    "get_run_dir", "log_artifact", "log_carbon_metrics", "log_context", "log_current_execution_time",
    "log_dataset", "log_execution_command", "log_flops_per_batch", "log_flops_per_epoch", "log_metric",
    "log_metrics", "log_model", "log_param", "log_params", "log_provenance_documents", "log_source_code",
    "log_system_metrics", "save_model_version", "start_run",
]


def _torch_installed() -> bool:
    """Whether torch can be imported, without importing it."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


if not _torch_installed():  # `from prov4ml_dist import *` must not fail where torch is absent
    __all__ = [name for name in __all__ if not _LAZY.get(name, "").startswith("prov4ml_dist.wrappers.")]
