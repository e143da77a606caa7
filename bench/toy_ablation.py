"""
The MNIST toy's p(t) ablation and learning curves: one student per p(t) schedule, all distilled from the same
teacher on the same batches, noise and timesteps (toy_mnist.train_students), each judged on every digit.

    python bench/toy_ablation.py --data-dir DIR                      # every schedule, the toy's step budget
    python bench/toy_ablation.py --data-dir DIR --schedules exp:5 --student-steps 6400 --eval-every 400

--eval-every N also judges the unseen digit every N steps (the same noise each time) and reports the first
step at which each student reaches --target. Note that the learning rate follows a cosine over the whole
run, so the curve of a long run is not the end point of shorter runs. Every toy_mnist.py flag works too
(--preset quick, --out, --threads, --rc-lambda is ignored: use --schedules); teacher and judge are shared
with toy_mnist.py through --out. Writes OUT/ablation.json.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import toy_mnist as tm  # noqa: E402

SCHEDULES = ["none", "exp:2", "exp:5", "exp:10", "sigmoid", "two_sided:5", "constant:1"]


def parse_schedule(spec: str) -> tuple[str, float]:
    """'exp:5' -> ('exp', 5.0); 'sigmoid' -> ('sigmoid', 0.0). Checked against randcond.replace_prob."""
    name, _, lam = spec.partition(":")
    try:
        lam = float(lam or 0.0)
        tm.randcond.replace_prob(torch.zeros(1, dtype=torch.long), tm.T, name, lam)
    except ValueError as e:
        raise SystemExit(f"error: --schedules {spec}: {e}") from None
    return name, lam


def main(argv: list[str] | None = None) -> dict:
    p = tm.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--schedules", nargs="+", default=SCHEDULES, help="one student per schedule[:lambda]")
    p.add_argument("--eval-every", type=int, default=0, help="judge the unseen digit every N student steps")
    p.add_argument("--target", type=float, default=0.8, help="report the first step with unseen accuracy >= this")
    args, rest = p.parse_known_args(argv)
    if args.eval_every < 0:
        raise SystemExit("error: --eval-every takes N >= 0")
    cfg = tm.parse_args(rest)
    schedules = {spec: parse_schedule(spec) for spec in args.schedules}
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device, out = torch.device(auto if cfg.device == "auto" else cfg.device), Path(cfg.out)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0, data = time.perf_counter(), tm.load_mnist(cfg.data_dir, cfg.seed)
    teacher, judge = tm.teacher_and_judge(cfg, data, device, out)
    seen = ~torch.isin(data["y_train"], torch.tensor(cfg.unseen))
    curves = {spec: [] for spec in schedules}

    def on_step(step: int, students: dict) -> None:
        if args.eval_every and step % args.eval_every == 0:
            for spec, student in students.items():
                curves[spec].append((step, float(np.mean(tm.judge_samples(cfg, student, judge, cfg.unseen)[1]))))
                tm.tqdm.write(f"step {step} {spec}: unseen {curves[spec][-1][1]:.2f}")

    students = tm.train_students(cfg, schedules, teacher, data["x_train"][seen], data["y_train"][seen], on_step)
    rows = []
    for spec, student in students.items():
        acc = tm.judge_samples(cfg, student, judge, list(range(10)))[1]
        reached = [step for step, a in curves[spec] if a >= args.target]
        rows.append(
            dict(
                schedule=spec,
                per_class_accuracy=acc,
                curve=curves[spec],
                first_step_at_target=min(reached, default=None),
            )
        )
        rows[-1] |= dict(unseen_mean=float(np.mean([acc[d] for d in cfg.unseen])))
        rows[-1] |= dict(seen_mean=float(np.mean([a for d, a in enumerate(acc) if d not in cfg.unseen])))
    report = dict(note=tm.QUICK_NOTE if cfg.preset == "quick" else None, config=vars(cfg), target=args.target)
    report |= dict(students=rows, seconds=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads())
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'p(t)':<14}{'unseen':>8}{'seen':>7}  first step >= {args.target:g}")
    for r in rows:
        print(f"{r['schedule']:<14}{r['unseen_mean']:>8.2f}{r['seen_mean']:>7.2f}  {r['first_step_at_target']}")
    print(
        f"{report['seconds']:.0f} s; wrote {out / 'ablation.json'}"
        + (f"\nnote: {tm.QUICK_NOTE}" if report["note"] else "")
    )
    return report


if __name__ == "__main__":
    main()
