"""The trainer's loop under Ray Train (TorchTrainer + ScalingConfig), unchanged.

Each Ray Train worker runs `mmloom.train.loop.train`; accelerate picks up the process
group Ray Train set up. Every checkpoint the loop writes is reported to Ray Train (rank 0
attaches the directory), and after a worker or node failure Ray Train restarts the worker
group, which copies the last reported checkpoint back into ``loop.out`` and resumes from
it. Without Ray the same loop runs under ``accelerate launch -m mmloom train``.

    python -m mmloom.ray_jobs.train configs/train/mumu-tiny.yaml --num-workers 2 --ray-address auto
"""

from __future__ import annotations

import argparse
import os
import shutil

from mmloom.configbase import load_model
from ..curate.runner import init_ray  # first: it settles Ray's auth mode before ray is imported
from ..train.config import TrainConfig

STEP_FILE = "MMLOOM_STEP"


def train_loop_per_worker(config: dict) -> None:
    import ray.train as rt

    from ..train.loop import train

    cfg = TrainConfig.model_validate(config["train"])
    ctx = rt.get_context()
    rank = ctx.get_world_rank()
    # Ray Train has set up torch.distributed; tell accelerate which process this is
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(ctx.get_world_size()),
                       "LOCAL_RANK": str(ctx.get_local_rank()), "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size())})
    ckpt = rt.get_checkpoint()
    if ckpt is not None and rank == 0:
        with ckpt.as_directory() as d:
            name = open(os.path.join(d, STEP_FILE)).read().strip()
            dest = os.path.join(cfg.loop.out, "checkpoints", name)
            if not os.path.exists(os.path.join(dest, "DONE")):
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(d, dest)

    def report(path: str, step: int, metrics: dict) -> None:
        checkpoint = None
        if rank == 0:
            with open(os.path.join(path, STEP_FILE), "w") as f:
                f.write(os.path.basename(path))
            checkpoint = rt.Checkpoint.from_directory(path)
        rt.report(metrics, checkpoint=checkpoint)

    train(cfg, on_checkpoint=report)


def fit(cfg: TrainConfig, num_workers: int = 1, use_gpu: bool = False, storage_path: str | None = None,
        max_failures: int = 2, ray_address: str | None = None, name: str = "mmloom-train"):
    """Run ``cfg`` with Ray Train; returns Ray Train's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray(ray_address)
    out = os.path.abspath(cfg.loop.out) if "://" not in cfg.loop.out else cfg.loop.out
    cfg = cfg.model_copy(update={"loop": cfg.loop.model_copy(update={"out": out})})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=name, storage_path=storage_path or os.path.join(out, "ray_train"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train with Ray Train")
    ap.add_argument("config")
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--storage-path", default=None, help="where Ray Train keeps reported checkpoints (shared)")
    ap.add_argument("--max-failures", type=int, default=2)
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--shards", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args(argv)
    cfg = load_model(TrainConfig, a.config, {"data.shards": a.shards, "loop.out": a.out, "loop.steps": a.steps})
    result = fit(cfg, a.num_workers, a.use_gpu, a.storage_path, a.max_failures, a.ray_address)
    print(f"ray train: finished with metrics {result.metrics}; checkpoint {result.checkpoint}")
    return 0 if result.error is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
