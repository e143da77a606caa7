"""
Cost and accuracy of evaluate.py's metric step at the protocol's sizes (2048-dim Inception pool features,
1008 logits, 30K images), on random features: its FID (eigh of symmetric matrices) vs pytorch-fid's formula
(scipy's sqrtm of the covariance product), and IS.
    OMP_NUM_THREADS=1 python bench/evaluate_metrics.py [--n-real 40504 --n-fake 30000] [--json]
Feature extraction and generation are GPU work and are not measured here.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--n-real", type=int, default=6000)
p.add_argument("--n-fake", type=int, default=5000)
p.add_argument("--dim", type=int, default=2048)
p.add_argument("--json", action="store_true", help="also print the figures as one JSON object on the last line")
args = p.parse_args()

torch.manual_seed(0)
mix = torch.randn(args.dim, args.dim, dtype=torch.float64) / args.dim**0.5
# non-negative and correlated, like post-ReLU pool features
real = (torch.randn(args.n_real, args.dim, dtype=torch.float64) @ mix).abs()
fake = (torch.randn(args.n_fake, args.dim, dtype=torch.float64) @ mix).abs() * 1.05

t0 = time.perf_counter()
ref = evaluate.feature_stats(real)
t1 = time.perf_counter()
fid = evaluate.frechet_distance(ref, fake)
t2 = time.perf_counter()
mu, sigma = fake.mean(0).numpy(), np.cov(fake.numpy(), rowvar=False)
covmean = scipy.linalg.sqrtm(ref["sigma"] @ sigma).real
expected = ((ref["mu"] - mu) ** 2).sum() + np.trace(ref["sigma"]) + np.trace(sigma) - 2 * np.trace(covmean)
t3 = time.perf_counter()
ref_s = t1 - t0
print(f"reference stats ({args.n_real} x {args.dim}): {t1 - t0:.1f} s")
print(
    f"FID evaluate.py: {fid:.6f} in {t2 - t1:.1f} s | scipy sqrtm: {expected:.6f} in {t3 - t2:.1f} s "
    f"| relative difference {abs(fid - expected) / expected:.1e}"
)

logits = torch.randn(args.n_fake, 1008, dtype=torch.float64) * 2
t0 = time.perf_counter()
mean, std = evaluate.inception_score(logits, 10)
is_s = time.perf_counter() - t0
print(f"IS ({args.n_fake} x 1008, 10 splits): {mean:.3f} ± {std:.3f} in {is_s:.1f} s")
print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
if args.json:
    print(
        json.dumps(
            {
                "n_real": args.n_real,
                "n_fake": args.n_fake,
                "dim": args.dim,
                "ref_stats_s": ref_s,
                "fid_s": t2 - t1,
                "fid_scipy_s": t3 - t2,
                "fid": fid,
                "fid_scipy": float(expected),
                "fid_relative_difference": abs(fid - expected) / expected,
                "is_s": is_s,
                "is_mean": mean,
                "threads": torch.get_num_threads(),
            }
        )
    )
