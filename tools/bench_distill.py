"""Benchmark: several students on one teacher forward vs one distillation job per student.

Times, on one device, with random weights and random images of the recipe's sizes:
- the teacher forward on the global crops of a batch (what one job pays once per step),
- each student's training step (forward, backward, AdamW) on the teacher's targets,
- one multi-student step (one teacher forward, every student in turn: ``dinosys distill``)
  against the sum of single-student steps (each with its own teacher forward: separate jobs).

Prints per-student images/s, the teacher's share of a single-student step and the measured
saving; the last stdout line is one JSON object. Defaults run in about a minute on a CPU:

    python tools/bench_distill.py
    python tools/bench_distill.py --teacher vitg14 --students vits14,vitb14,vitl14 \
        --batch 32 --size 224 --local-size 98 --n-local 8     # a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from dinosys.data.augment import CropConfig
from dinosys.distill.config import DistillConfig, DistillLossConfig, StudentConfig, TeacherConfig
from dinosys.distill.task import DistillTask
from dinosys.distill.teacher import Teacher, TeacherSource
from dinosys.distributed.env import DistEnv
from dinosys.models import backbone_from_config
from dinosys.models.heads import HeadConfig, build_heads
from dinosys.models.vit import BackboneConfig
from dinosys.train.optim import build_optimizer
from dinosys.train.tasks.ssl import SSLOptimConfig

CPU_ARCHS = {  # name -> (width, depth, heads): small enough for a shared CPU
    "cpu_teacher": (256, 6, 4), "cpu_s": (64, 4, 2), "cpu_b": (96, 4, 3), "cpu_l": (128, 6, 4)}


def backbone_cfg(name: str, size: int, patch: int) -> BackboneConfig:
    """A BackboneConfig by arch name, or one of the small CPU_ARCHS."""
    if name in CPU_ARCHS:
        width, depth, heads = CPU_ARCHS[name]
        return BackboneConfig(arch="vit_tiny", img_size=size, patch_size=patch, embed_dim=width,
                              depth=depth, num_heads=heads, layerscale_init=None)
    return BackboneConfig(arch=name, img_size=size)


def random_teacher(cfg: BackboneConfig, heads: HeadConfig) -> Teacher:
    """A Teacher with random weights and DINO/iBOT heads (no files involved)."""
    backbone = backbone_from_config(cfg)
    dino, _ = build_heads(heads, backbone.embed_dim)
    return Teacher(TeacherSource("benchmark", Path("random"), cfg, backbone.state_dict(),
                                 heads, {"dino_head": dino.state_dict()}))


def make_batch(b: int, crops: CropConfig, grid: int) -> dict:
    """A batch in the loader's layout with random images."""
    return {"global_crops": torch.randn(2 * b, 3, crops.global_size, crops.global_size),
            "local_crops": (torch.randn(crops.n_local * b, 3, crops.local_size, crops.local_size)
                            if crops.n_local else torch.empty(0)),
            "masks": torch.zeros(2 * b, grid * grid, dtype=torch.bool), "batch_size": b}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="cpu_teacher")
    p.add_argument("--students", default="cpu_s,cpu_b,cpu_l")
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--local-size", type=int, default=28)
    p.add_argument("--n-local", type=int, default=2)
    p.add_argument("--prototypes", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7, help="alternating rounds")
    p.add_argument("--bf16", action="store_true", help="autocast the students to bf16 (GPU)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    crops = CropConfig(global_size=args.size, local_size=args.local_size, n_local=args.n_local)
    heads = HeadConfig(n_prototypes=args.prototypes, hidden_dim=512, bottleneck_dim=128)
    t_cfg = backbone_cfg(args.teacher, args.size, args.patch)
    torch.manual_seed(0)
    teacher = random_teacher(t_cfg, heads)
    names = [n.strip() for n in args.students.split(",") if n.strip()]
    students = [StudentConfig(name=f"s{i}_{n}", model=backbone_cfg(n, args.size, args.patch),
                              heads=replace(heads)) for i, n in enumerate(names)]
    loss = DistillLossConfig(mode="heads")
    batch = make_batch(args.batch, crops, args.size // teacher.patch_size)

    def job(members: list[StudentConfig]) -> tuple[DistillTask, torch.optim.Optimizer]:
        cfg = DistillConfig(teacher=TeacherConfig(path="random"), students=members, loss=loss,
                            crops=crops, optim=SSLOptimConfig(), max_steps=1)
        task = DistillTask(cfg, DistEnv(device=device), teacher=teacher)
        return task, build_optimizer(task.param_groups(), cfg.optim)

    def step(task: DistillTask, opt: torch.optim.Optimizer) -> None:
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16
               else torch.autocast(device.type, enabled=False))
        with ctx:
            out = task.forward_loss(batch, 0)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    single = {s.name: job([s]) for s in students}
    teacher_task = next(iter(single.values()))[0]
    multi = job(students)
    # alternating rounds (teacher, each single job, the multi job): a shared machine's load
    # drifts, and every variant then sees the same drift
    rounds: dict[str, list[float]] = {}
    variants = {"teacher": lambda: teacher_task.teacher_outputs(
        batch["global_crops"].to(device)), "multi": lambda: step(*multi)}
    variants.update({n: (lambda t=t, o=o: step(t, o)) for n, (t, o) in single.items()})
    for _ in range(args.repeats):
        for key, fn in variants.items():
            rounds.setdefault(key, []).append(timed(fn, device, 1))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    t_teacher, t_multi = med.pop("teacher"), med.pop("multi")
    t_single = med
    separate = sum(t_single.values())
    per_student = {n: {"images_per_s_alone": args.batch / t,
                       "step_s": t, "teacher_share": t_teacher / t}
                   for n, t in t_single.items()}
    saving = 1.0 - t_multi / separate
    expected = (len(students) - 1) * t_teacher / separate
    for n, v in per_student.items():
        print(f"{n:>14}: {v['images_per_s_alone']:8.1f} img/s alone, step {v['step_s']*1e3:7.1f}"
              f" ms, teacher forward is {100 * v['teacher_share']:.0f}% of it")
    print(f"teacher forward {t_teacher * 1e3:.1f} ms; {len(students)} students on one teacher "
          f"forward: {t_multi * 1e3:.1f} ms/step vs {separate * 1e3:.1f} ms as separate jobs: "
          f"saving {100 * saving:.1f}% (the teacher's share predicts {100 * expected:.1f}%)")
    print(json.dumps({"device": str(device), "teacher": args.teacher, "students": names,
                      "batch": args.batch, "size": args.size,
                      "teacher_forward_s": t_teacher, "multi_step_s": t_multi,
                      "separate_steps_s": separate, "saving": saving,
                      "saving_predicted_by_teacher_share": expected,
                      "multi_images_per_s_per_student": args.batch / t_multi,
                      "per_student": per_student}))


if __name__ == "__main__":
    main()
