"""
The README's figures, drawn by the code in this repository (matplotlib).

    python docs/figures.py p_t                           # docs/p_t.png: p(t) of every randcond schedule
    python docs/figures.py influence --data-dir DIR      # docs/condition_influence.png, with the toy's teacher
    python docs/figures.py log runs/x/log.jsonl          # runs/x/log.png: a train.py run's curves

influence: the paper's Fig. 3 on MNIST, with toy_mnist.py's teacher and judge from the toy's --out (./runs/mnist),
trained there first if missing. The toy's flags work (--threads 1, --seed, ...); --preset quick is for the tests.
"""

import argparse
import io
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: files only, whatever the display
from PIL import Image

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
import randcond  # noqa: E402
import toy_mnist as tm  # noqa: E402

LAMBDAS = {"exp": (2.0, 5.0, 10.0), "two_sided": (5.0,), "constant": (0.5,)}  # the others do not read lambda


def save_png(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    Image.open(buf).convert("RGB").quantize(64).save(path, optimize=True)  # 64 colours: tens of kB, fit to commit


def p_t(png: Path) -> dict[str, float]:
    """p(t) of every schedule in randcond.SCHEDULES. Returns the share of samples each swaps, the mean of p(t) over
    the T timesteps that training draws uniformly, keyed 'schedule' or 'schedule:lambda'."""
    t, shares, ax = torch.arange(tm.T), {}, (fig := Figure(figsize=(7.5, 4))).subplots()
    for schedule in randcond.SCHEDULES:
        for lam in LAMBDAS.get(schedule, (None,)):
            p = randcond.replace_prob(t, tm.T, schedule, *([] if lam is None else [lam]))
            key = schedule if lam is None else f"{schedule}:{lam:g}"
            shares[key] = float(p.double().mean())
            what = "" if lam is None else f", {'p' if schedule == 'constant' else 'λ'} = {lam:g}"  # constant: lam is p
            label = f"{schedule}{what}{' (published)' * (key == 'exp:5')}: {shares[key]:.0%} swapped"
            ax.plot(t, p, lw=2.5 if key == "exp:5" else 1.5, ls="--" if schedule == "two_sided" else "-", label=label)
    ax.set(xlabel="timestep t (T = 1000; the larger t, the noisier x_t)", ylabel="p(t): chance of a swapped condition")
    ax.set_title("Random conditioning: p(t), and the share of training samples it swaps (the mean over t)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    save_png(fig, png)
    return shares


def influence(cfg: argparse.Namespace, png: Path) -> dict:
    """Held-out digits x_0 noised to x_t, denoised from t (DDIM, the toy's guidance) under another digit's label;
    the judge says whose digit came out. Returns the shares per t and the t where the condition takes over."""
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    data = tm.load_mnist(cfg.data_dir, cfg.seed)
    (out := Path(cfg.out)).mkdir(parents=True, exist_ok=True)
    teacher, judge = tm.teacher_and_judge(cfg, data, device, out)
    full = 300, [*range(50, tm.T, 50)], [*range(100, tm.T, 100)]  # images measured, t measured, t pictured
    n, ts, rows = (16, [100, 500, 900], [100, 900]) if cfg.preset == "quick" else full
    g = torch.Generator().manual_seed(cfg.seed + 7)
    pick = torch.randperm(len(data["y_heldout"]), generator=g)[:n]
    x_0, source = data["x_heldout"][pick], data["y_heldout"][pick]  # (n, 1, 28, 28), (n,)
    condition = (source + torch.randint(1, 10, (n,), generator=g)) % 10  # another digit, uniformly
    noise = torch.randn(x_0.shape, generator=g)

    def denoise(x_0: torch.Tensor, labels: torch.Tensor, t: int, noise: torch.Tensor) -> tuple:  # x_t, its image
        # the toy's guidance, and t / T of its DDIM steps
        x_t = tm.add_noise(x_0, noise, torch.full((len(x_0),), t))
        steps = max(1, round(cfg.sample_steps * t / tm.T))
        return x_t, tm.ddim_sample(teacher, labels.to(device), x_t.to(device), steps, cfg.guidance, start=t).cpu()

    preds = [judge(denoise(x_0, condition, t, noise)[1].to(device)).argmax(1).cpu() for t in tm.tqdm(ts, "from t")]
    table = dict(t=ts, source=[float((p == source).float().mean()) for p in preds], images=n)
    table["condition"] = [float((p == condition).float().mean()) for p in preds]
    # the cross-over: the first t from which more outputs show the condition's digit than x_0's (None: never)
    table["crossover_t"] = cross = next((t for t, s, c in zip(ts, table["source"], table["condition"]) if c > s), None)
    tiles = []  # the picture: the first x_0 at every t in rows, denoised under every label
    for t in rows:
        x_t, out = denoise(x_0[:1].expand(10, -1, -1, -1), torch.arange(10), t, noise[:1].expand(10, -1, -1, -1))
        tiles.append(F.pad(torch.cat([x_t[0], torch.ones(1, 28, 8), *out], -1)[0], (0, 0, 2, 2), value=1))
    left, right = (fig := Figure(figsize=(13, 0.6 * len(rows) + 1.5))).subplots(1, 2, width_ratios=[1.6, 1])
    left.imshow(torch.cat(tiles).clamp(-1, 1), cmap="gray")
    left.set_xticks([14, *(50 + 28 * c for c in range(10))], ["x_t", *map(str, range(10))])
    left.set_yticks([16 + 32 * i for i in range(len(rows))], [f"t = {t}" for t in rows])
    left.set_xlabel(f"x_t, then x_t denoised under each label (x_0 is a {int(source[0])})")
    right.plot(ts, table["source"], "o-", label="classified as x_0's digit")
    right.plot(ts, table["condition"], "s-", label="classified as the condition")
    if cross is not None:
        right.axvline(cross, color="gray", ls="--", label=f"cross-over, t = {cross}")
    right.set(xlabel="t, the noise level denoising starts from", ylabel=f"share of {n} held-out digits", ylim=(0, 1))
    right.legend(loc="center right", fontsize=8)
    where = "it never takes over" if cross is None else f"the condition's from t = {cross} on"
    fig.suptitle(f"x_0 noised to x_t, denoised under another digit's label: x_0's content at small t, {where}")
    save_png(fig, png)
    return table


def log_curves(log: Path, png: Path) -> list[str]:
    """A train.py log.jsonl as curves against the step: loss terms, swap rate, gradient norm, learning rate (keys
    zero in every record are left out). Returns the keys drawn."""
    lines = [line for line in log.read_text().splitlines() if line.endswith("}")]  # not a line cut short by a kill
    records = [r for r in map(json.loads, lines) if "step" in r]
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if any(r.get(k) for r in records)]
    losses = [k for k in keys if k.startswith("loss")]
    groups = ([losses] if losses else []) + [[k] for k in ("rc_swap_rate", "grad_norm", "lr") if k in keys]
    if not groups:
        raise SystemExit(f"error: {log}: no record with a step and a non-zero loss, swap rate, grad_norm or lr")
    axes = (fig := Figure(figsize=(8, 2.2 * len(groups) + 0.5))).subplots(len(groups), 1, sharex=True, squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        for k in group:
            ax.plot([r["step"] for r in records if k in r], [r[k] for r in records if k in r], label=k)
        ax.set(yscale="log" if group is losses else "linear")  # a loss falls over decades
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set(xlabel=f"step ({log})")
    save_png(fig, png)
    return [k for group in groups for k in group]


def main(argv: list[str] | None = None):
    p = tm.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("figure", choices=["p_t", "influence", "log"])
    p.add_argument("log", nargs="?", type=Path, help="log: a train.py run's log.jsonl")
    p.add_argument("--png", type=Path, help="the PNG to write (default: in docs/, or beside the log)")
    args, rest = p.parse_known_args(argv)
    if rest and args.figure != "influence" or (args.figure == "log") != (args.log is not None):
        raise SystemExit("error: usage: figures.py p_t | influence [toy_mnist.py flags] | log LOG_JSONL [--png PNG]")
    if args.figure == "p_t":
        shares = p_t(args.png or DOCS / "p_t.png")
        print("share of samples swapped: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
        return shares
    if args.figure == "log":
        return log_curves(args.log, args.png or args.log.with_suffix(".png"))
    table = influence(tm.parse_args(rest), args.png or DOCS / "condition_influence.png")
    print("t, share classified as x_0's digit, as the condition:")
    print("\n".join(f"{t:>5} {s:>6.2f} {c:>6.2f}" for t, s, c in zip(table["t"], table["source"], table["condition"])))
    print(f"cross-over: the condition takes over from x_0's digit at t = {table['crossover_t']} (of {tm.T})")
    return table


if __name__ == "__main__":
    main()
