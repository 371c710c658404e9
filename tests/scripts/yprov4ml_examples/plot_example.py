"""yProv4ML's plotting example (examples/plot_example.py), same calls in the same order. The
figure is written into the working directory as in yProv4ML (each rank its own name here, so
that two ranks never write one file). Only the import line differs."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _check import check_merged  # noqa: E402

import prov4ml_dist as yprov4ml  # noqa: E402

yprov4ml.start_run(
    prov_user_namespace="www.example.org",
    experiment_name="plot_example",
    provenance_save_dir="prov",
    collect_all_processes=False,
    disable_codecarbon=True,
)

yprov4ml.log_source_code()

data = [1, 2, 3, 4, 5]

plt.plot(data)
figure = f"tmp{os.environ.get('RANK', '')}.png"
plt.savefig(figure)

yprov4ml.log_artifact("tmp", figure)

prov_json = yprov4ml.end_run(create_graph=True, create_svg=True, crate_ro_crate=False)
check_merged(prov_json, [])
if prov_json is not None:
    from prov4ml_dist.merge import load_merged

    run = load_merged(prov_json.parent / "merged.h5")
    ranks = sorted(g.rank for a in run.artifacts if a.name == "tmp" for g in a.generations)
    assert ranks == list(range(run.world_size)), ranks
