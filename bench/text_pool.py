"""
Benchmark: randcond.TextPool against a plain Python list of the same prompts.

    python bench/text_pool.py                  # 20,000,000 prompts (about 1.3 GB of text)
    python bench/text_pool.py --n 1000000 --json

Each side runs in a fresh child process so that resident memory is its own. After random reads the
pool's resident memory is mostly pages of the memory-mapped text (shared, dropped by the kernel under
pressure); "private" is the memory only this process holds. Prints a table; with --json also one JSON
object on the last line.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "a photo of a cat dog astronaut riding horse on the moon in a city at night oil painting "
    "watercolor portrait of an old man with a red hat cinematic lighting highly detailed 4k"
).split()


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory in MiB (Linux). RssAnon is the private part; RssFile, pages of mapped files,
    which the kernel can drop and share between processes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_prompts(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(4, 14))) + "\n")


def child(kind: str, path: str, reads: int) -> dict:
    """Open the pool (or load the list), then read random prompts; report times and memory."""
    if kind == "pool":
        import randcond  # torch's own import time and memory are not the pool's
    base, base_anon = rss_mb(), rss_mb("RssAnon")
    t0 = time.perf_counter()
    if kind == "pool":
        pool = randcond.TextPool(Path(path))
    else:
        with open(path, encoding="utf-8") as f:
            pool = [line.rstrip("\n") for line in f if line.strip()]
    open_s = time.perf_counter() - t0
    rss_open = rss_mb() - base
    rng = random.Random(1)
    idx = [rng.randrange(len(pool)) for _ in range(reads)]
    t0 = time.perf_counter()
    total = sum(len(pool[i]) for i in idx)
    read_s = time.perf_counter() - t0
    return {
        "n": len(pool),
        "open_s": open_s,
        "rss_open_mb": rss_open,
        "reads_per_s": reads / read_s,
        "rss_after_reads_mb": rss_mb() - base,
        "anon_after_reads_mb": rss_mb("RssAnon") - base_anon,
        "chars": total,
    }


def run_child(kind: str, path: Path, reads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path), "--reads", str(reads)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000_000, help="number of synthetic prompts")
    parser.add_argument("--reads", type=int, default=200_000, help="random prompts read after opening")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the prompts (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON on the last line")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.reads)))
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "prompts.txt"
        t0 = time.perf_counter()
        write_prompts(path, args.n)
        write_s = time.perf_counter() - t0
        import randcond

        t0 = time.perf_counter()
        randcond.TextPool(path)  # builds and caches the index
        build_s = time.perf_counter() - t0
        pool = run_child("pool", path, args.reads)  # opens with the cached index
        plain = run_child("list", path, args.reads)
        size_mb = path.stat().st_size / 2**20
        index_mb = sum(f.stat().st_size for f in Path(tmp).glob("*.rcidx")) / 2**20  # one index, beside the text

    print(f"{args.n:,} prompts, {size_mb:,.0f} MiB of text, index {index_mb:,.0f} MiB (written in {write_s:.1f} s)")
    print(f"{'':24}{'TextPool':>14}{'Python list':>14}{'list/pool':>10}")
    rows = [
        ("index build (s)", build_s, float("nan")),
        ("open (s)", pool["open_s"], plain["open_s"]),
        ("RSS after open (MiB)", pool["rss_open_mb"], plain["rss_open_mb"]),
        ("RSS after reads (MiB)", pool["rss_after_reads_mb"], plain["rss_after_reads_mb"]),
        ("  of it private (MiB)", pool["anon_after_reads_mb"], plain["anon_after_reads_mb"]),
        ("random reads / s", pool["reads_per_s"], plain["reads_per_s"]),
    ]
    for name, a, b in rows:
        ratio = b / a if a and b == b else float("nan")
        print(f"{name:24}{a:14,.2f}{b:14,.2f}{ratio:10.1f}")
    if args.json:
        print(
            json.dumps(
                {
                    "n": args.n,
                    "text_mib": size_mb,
                    "index_build_s": build_s,
                    "pool_open_s": pool["open_s"],
                    "list_open_s": plain["open_s"],
                    "pool_rss_mib": pool["rss_open_mb"],
                    "list_rss_mib": plain["rss_open_mb"],
                    "pool_private_after_reads_mib": pool["anon_after_reads_mb"],
                    "list_private_after_reads_mib": plain["anon_after_reads_mb"],
                    "memory_ratio": plain["rss_open_mb"] / max(pool["rss_open_mb"], 1e-3),
                    "pool_reads_per_s": pool["reads_per_s"],
                    "list_reads_per_s": plain["reads_per_s"],
                }
            )
        )


if __name__ == "__main__":
    main()
