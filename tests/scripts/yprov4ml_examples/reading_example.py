"""yProv4ML's reading example (examples/reading_example.py), same calls in the same order over a
merged run of ours (its names: our run label and entity ids). Only the import line differs."""

import sys

from prov4ml_dist.utils import getters

if __name__ == "__main__":

    path = sys.argv[1]
    experiment = sys.argv[2]
    # 1. list_activities
    print("=== Activities ===")
    for a in getters.list_activities(path):
        print(" ", a)
    print()

    # 2. list_entities (all, then filtered)
    print("=== Entities (models only) ===")
    models = getters.list_entities(path, "provml:Model")
    for e in models:
        print(" ", e)
    print()

    # 3. get_parameter
    print("=== Parameters ===")
    print("run_id          :", getters.get_parameter(path, experiment, "yprov:run_id"))
    print("world_size      :", getters.get_parameter(path, experiment, "yprov:world_size"))
    print("Training start  :", getters.get_parameter(path, experiment, "prov:startTime"))
    print()

    print("All parameters: ", getters.list_parameters(path, experiment))
    print()
    print("paths: ", getters.list_metric_paths(path, context="Validation"))
    print()

    # 4. get_metrics_as_df
    print("=== Metrics (Training) ===")
    df = getters.list_metrics(path, context="Training")
    print(df)
    print()

    print("=== Metric (Training) ===")
    df = getters.get_metric(path, name="MSELoss", context="Training")
    print(df)
    assert models and len(df["value"]) > 0 and getters.get_parameter(path, experiment, "yprov:run_id")
    print("READ OK")
