"""prov4ml_dist: provenance of distributed ML training — yProv4ML's API, one HDF5 shard per
rank, a rank-0 merge, and a W3C PROV-JSON with one agent per rank.

    import prov4ml_dist as prov4ml
"""

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
from .compat import (
    log_carbon_metrics,
    log_context,
    log_current_execution_time,
    log_execution_command,
    log_flops_per_batch,
    log_flops_per_epoch,
    log_source_code,
    log_system_metrics,
)
from .context import Context, LoggingItemKind
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

__all__ = [
    "ArtifactError", "Context", "InvalidInputError", "LoggingItemKind", "MergeError", "ModelSaveError",
    "Prov4MLError", "RunStateError", "ShardError", "end_run", "get_active_run", "log_artifact",
    "log_carbon_metrics", "log_context", "log_current_execution_time", "log_dataset", "log_execution_command",
    "log_flops_per_batch", "log_flops_per_epoch", "log_metric", "log_metrics", "log_model", "log_param",
    "log_params", "log_source_code", "log_system_metrics", "save_model_version", "start_run",
]
