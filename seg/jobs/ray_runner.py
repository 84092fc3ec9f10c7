"""`seg predict --ray`: a batch's predictions on Ray Data, one `Predictor` per actor.

`seg.jobs.batch.run_batch` plans the job as without Ray (inputs, output names, what a rerun skips) and writes
the summary; only the images to predict go to Ray, one row each, and come back as the same summary
entries, in whatever order they finish. Each actor builds its own ONNX Runtime session (sessions do not
pickle) with as many threads as the CPUs it holds, or one GPU on CUDA, and predicts each image with
`Predictor.predict_file` (a stack slice by slice): a huge TIFF is one row that its actor reads band by band.
Inputs, the model and outputs must be on a file system that every node sees.

With no address (and no RAY_ADDRESS) a local Ray starts inside the process and stops at the end;
`address="auto"` or "ray://HOST:10001" joins a running cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from seg.errors import SegError
from seg.inference.predictor import Predictor
from seg.inference.tiling import TilingOptions
from seg.jobs.job import Job, run_job


class _Quiet:
    """What `seg.jobs.job.run_job` needs of a progress display, inside an actor: nothing."""

    live = False

    def end_sub(self) -> None:
        pass


class PredictActor:
    """A Ray Data actor: one predictor, built once, for every row it is given."""

    def __init__(self, model: str, device: str, threads: int, options: dict[str, Any]):
        self.predictor = Predictor.from_onnx(model, device=device, threads=threads)  # the file the driver chose
        self.options = TilingOptions(**options)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        spec = json.loads(row["job"])
        job = Job(Path(spec["source"]), Path(spec["relative"]), {k: Path(v) for k, v in spec["outputs"].items()},
                  slices=spec["slices"])  # fmt: skip
        entry = run_job(self.predictor, self.options, job, False, json.loads(row["made_with"]), {}, _Quiet())
        return {"index": row["index"], "entry": json.dumps(entry)}


def require_ray():
    """The ray module, or a SegError saying how to install it."""
    try:
        import ray
    except ModuleNotFoundError:
        raise SegError("--ray needs Ray, from the distributed extra: pip install 'seg[distributed]'") from None
    return ray


def ray_results(
    predictor: Predictor,
    options: TilingOptions,
    todo: list[tuple[int, Any, dict[str, Any] | None]],
    console: Console,
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, summary entry) of each (index, job, made_with) in `todo`, predicted by Ray actors.

    Args:
        predictor: the driver's predictor of the model (its file, device and tiling).
        options: the tiling.
        todo: the jobs to predict, with their index in the run and their `made_with` record.
        console: where the cluster's size is reported.
        address: a Ray cluster to join ("auto", "ray://HOST:PORT"); None: RAY_ADDRESS, else a local Ray.
        actors: actors to run (default: one per GPU on CUDA, else the cluster's CPUs / threads).
        threads: CPUs, and ONNX Runtime threads, per actor on the CPU (default 2).
    """
    ray = require_ray()
    if not todo:
        return
    started = not ray.is_initialized()
    if started:
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise SegError(f"--ray-address {address}: cannot join the Ray cluster ({err})") from None
    try:
        yield from _run(ray, predictor, options, todo, console, actors, threads)
    finally:
        if started:
            ray.shutdown()


def _run(ray, predictor, options, todo, console, actors, threads):
    gpu = predictor.provider == "CUDAExecutionProvider"
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    per_actor = 1 if gpu else max(1, threads or 2)
    if actors is None:
        actors = max(1, int(resources.get("GPU", 0)) if gpu else cpus // per_actor)
    if actors < 1:
        raise SegError(f"--ray-actors {actors}: must be at least 1")
    console.print(
        f"Ray: {actors} actor(s), each with {'1 GPU' if gpu else f'{per_actor} CPU(s)'}, on a cluster of {cpus} CPU(s)"
        f" and {int(resources.get('GPU', 0))} GPU(s)", highlight=False, soft_wrap=True,
    )  # fmt: skip
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    rows = [
        {"index": i, "made_with": json.dumps(made_with),
         "job": json.dumps({"source": str(job.source), "relative": str(job.relative), "slices": job.slices,
                            "outputs": {k: str(v) for k, v in job.outputs.items()}})}
        for i, job, made_with in todo
    ]  # fmt: skip
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
        PredictActor,
        fn_constructor_kwargs={"model": str(Path(predictor.path).resolve()), "device": "cuda" if gpu else "cpu",
                               "threads": per_actor, "options": dataclasses.asdict(options)},
        concurrency=actors, num_cpus=0 if gpu else per_actor, num_gpus=1 if gpu else 0,
    )  # fmt: skip
    try:
        for row in dataset.iter_rows():
            yield int(row["index"]), json.loads(row["entry"])
    except Exception as err:  # an actor that could not start (e.g. no model file on its node), a lost node
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise SegError(f"the Ray job failed: {lines[-1] if lines else type(err).__name__}") from None
