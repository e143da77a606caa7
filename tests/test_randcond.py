"""Tests of the method library: schedules, selector, text pool, distillation losses."""

import gzip
import math
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from scipy import stats

import randcond as rc

T = 1000


# --- p(t)


def _expected(schedule: str, t: int, lam: float) -> float:
    s = t / T
    return {
        "exp": math.exp(-lam * (1 - s)),
        "sigmoid": 1 / (1 + math.exp(-20 * (s - 0.7))),
        "two_sided": max(math.exp(-lam * (1 - s)), math.exp(-lam * s)),
        "constant": lam,
        "none": 0.0,
    }[schedule]


@pytest.mark.parametrize(
    "schedule,lam", [("exp", 5.0), ("exp", 2.0), ("sigmoid", 5.0), ("two_sided", 5.0), ("constant", 0.3), ("none", 5.0)]
)
def test_replace_prob_values(schedule, lam):
    t = torch.tensor([0, T // 2, T - 1])
    p = rc.replace_prob(t, T, schedule, lam)
    assert p.dtype == torch.float32 and p.shape == t.shape
    for ti, pi in zip(t.tolist(), p.tolist()):
        assert pi == pytest.approx(_expected(schedule, ti, lam), rel=1e-5, abs=1e-7)


def test_replace_prob_published_points():
    p = rc.replace_prob(torch.tensor([0, 500, 800, 999]))
    assert p.tolist() == pytest.approx([0.0067, 0.082, 0.37, 0.995], abs=3e-3)  # as quoted, rounded


def test_replace_prob_keeps_shape():
    t = torch.randint(0, T, (3, 4))
    assert rc.replace_prob(t).shape == (3, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(schedule="cosine"), "exp, sigmoid, two_sided, constant, none"),
        (dict(schedule="constant", lam=1.5), r"\[0, 1\]"),
        (dict(schedule="exp", lam=-1.0), ">= 0"),
    ],
)
def test_replace_prob_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rc.replace_prob(torch.tensor([1]), **kwargs)


@pytest.mark.parametrize("t", [-1, T])
def test_replace_prob_rejects_out_of_range_timesteps(t):
    with pytest.raises(ValueError, match="timesteps"):
        rc.replace_prob(torch.tensor([t]))


def test_mean_swap_rate_exp_lambda5_is_about_20_percent():
    exact = rc.replace_prob(torch.arange(T)).mean().item()
    assert exact == pytest.approx((1 - math.exp(-5)) / 5, abs=2e-3)  # integral of exp(-5 (1 - s)) ds
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (200_000,), generator=g)
    rate = rc.random_condition_mask(t, generator=g).float().mean().item()
    assert rate == pytest.approx(0.20, abs=0.01)


@pytest.mark.parametrize("schedule", ["exp", "sigmoid", "two_sided"])
def test_empirical_swap_rate_per_band_matches_p(schedule):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, T, (400_000,), generator=g)
    mask = rc.random_condition_mask(t, schedule=schedule, generator=g)
    p = rc.replace_prob(t, schedule=schedule)
    for lo in range(0, T, 100):  # ten bands of 100 timesteps
        band = (t >= lo) & (t < lo + 100)
        n = band.sum().item()
        expected = p[band].double().mean().item()
        observed = mask[band].double().mean().item()
        sigma = math.sqrt(max(expected * (1 - expected), 1e-6) / n)
        assert abs(observed - expected) < 5 * sigma + 1e-4, (lo, observed, expected)


def test_mask_is_reproducible_and_bool():
    t = torch.randint(0, T, (64,))
    a = rc.random_condition_mask(t, generator=torch.Generator().manual_seed(3))
    b = rc.random_condition_mask(t, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.bool and torch.equal(a, b)


# --- RandomConditioner


def _draw_strings(n=20_000, null_prob=0.1, seed=0):
    pool = [f"pool prompt {i}" for i in range(10)]
    cond = rc.RandomConditioner(pool, null_prob=null_prob)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (n,), generator=g)
    own = [f"own caption {i}" for i in range(n)]
    selected, paired = cond(own, t, generator=g)
    return pool, own, t, selected, paired


def test_strings_paired_flags_mark_exactly_the_replaced_samples():
    pool, own, t, selected, paired = _draw_strings(null_prob=0.0)
    assert paired.dtype == torch.bool and paired.shape == (len(own),)
    for o, s, p in zip(own, selected, paired.tolist()):
        assert (s == o) == p
        if not p:
            assert s in pool
    # swapped share follows p(t)
    assert (~paired).float().mean().item() == pytest.approx(rc.replace_prob(t).mean().item(), abs=0.01)


def test_strings_null_rate_and_independence_from_replacement():
    pool, own, t, selected, paired = _draw_strings(n=40_000)
    null = torch.tensor([s == "" for s in selected])
    assert null.float().mean().item() == pytest.approx(0.1, abs=0.006)
    # the null drop leaves paired alone and is independent of it
    rate_paired = null[paired].float().mean().item()
    rate_swapped = null[~paired].float().mean().item()
    assert rate_paired == pytest.approx(0.1, abs=0.01)
    assert rate_swapped == pytest.approx(0.1, abs=0.015)
    for o, s, p in zip(own, selected, paired.tolist()):
        assert s == "" or (s == o) == p


def test_strings_draws_are_uniform_over_the_pool():
    pool, own, t, selected, paired = _draw_strings(n=60_000, null_prob=0.0)
    counts = [sum(s == q for s in selected) for q in pool]
    assert sum(counts) == (~paired).sum().item()
    assert stats.chisquare(counts).pvalue > 1e-3


def test_strings_from_a_text_pool_file(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("alpha\nbeta\n", encoding="utf-8")
    cond = rc.RandomConditioner(rc.TextPool(path), schedule="constant", lam=1.0, null_prob=0.0)
    selected, paired = cond(["x"] * 50, torch.zeros(50, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert set(selected) == {"alpha", "beta"} and not paired.any()


def test_same_seed_same_selection():
    a = _draw_strings(n=500, seed=7)
    b = _draw_strings(n=500, seed=7)
    c = _draw_strings(n=500, seed=8)
    assert a[3] == b[3] and torch.equal(a[4], b[4])
    assert a[3] != c[3]


def test_labels_vectorised_flags_nulls_and_uniformity():
    n, K = 50_000, 10
    allowed = torch.arange(5, 10)  # disjoint from the own labels, so a swap is visible
    cond = rc.RandomConditioner(allowed, null_condition=K, null_prob=0.1)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, T, (n,), generator=g)
    own = torch.randint(0, 5, (n,), generator=g)
    selected, paired = cond(own, t, generator=g)
    assert selected.dtype == torch.long and selected.shape == own.shape
    null = selected == K
    assert null.float().mean().item() == pytest.approx(0.1, abs=0.006)
    kept = ~null
    assert torch.equal(selected[kept] == own[kept], paired[kept])
    assert torch.all((selected[kept & ~paired] >= 5) & (selected[kept & ~paired] < 10))
    counts = torch.bincount(selected[kept & ~paired] - 5, minlength=5).tolist()
    assert stats.chisquare(counts).pvalue > 1e-3
    assert null[paired].float().mean().item() == pytest.approx(null[~paired].float().mean().item(), abs=0.015)


def test_labels_int_pool_and_reproducibility():
    cond = rc.RandomConditioner(10, null_condition=10)
    own = torch.arange(32) % 10
    t = torch.randint(0, T, (32,), generator=torch.Generator().manual_seed(1))
    a = cond(own, t, generator=torch.Generator().manual_seed(5))
    b = cond(own, t, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].max() <= 10 and a[0].min() >= 0


def test_labels_need_a_null_condition():
    with pytest.raises(ValueError, match="null_condition"):
        rc.RandomConditioner(10)


def test_conditioner_rejects_length_mismatch():
    with pytest.raises(ValueError, match="timesteps"):
        rc.RandomConditioner(["a"])(["x", "y"], torch.tensor([1]))


# --- TextPool

TRICKY = [
    "a photo of a cat",
    "  leading and trailing spaces  ",
    "quotes \"double\" and 'single', commas, and a \\ backslash",
    "tabs\tinside\tthe line",
    "unicode: café, naïve, 東京の夜景, emoji 🐱🚀, RTL שלום",
    "x" * 200_000,  # very long
    "last line without newline",
]


def _write_pool(path, lines, blank_every=2, crlf=False):
    nl = "\r\n" if crlf else "\n"
    body = []
    for i, line in enumerate(lines):
        body.append(line)
        if i % blank_every == 0:
            body.append("   ")  # whitespace-only lines are blank
            body.append("")
    path.write_bytes(nl.join(body).encode("utf-8"))
    return path


def _indexes(folder):
    return sorted(folder.glob("*.rcidx"))


@pytest.mark.parametrize("crlf", [False, True])
def test_text_pool_round_trips_tricky_lines(tmp_path, crlf):
    pool = rc.TextPool(_write_pool(tmp_path / "pool.txt", TRICKY, crlf=crlf))
    assert len(pool) == len(TRICKY)
    assert [pool[i] for i in range(len(pool))] == TRICKY
    assert pool[-1] == TRICKY[-1]
    with pytest.raises(IndexError):
        pool[len(TRICKY)]


def test_text_pool_several_files_with_an_empty_one(tmp_path):
    a = _write_pool(tmp_path / "a.txt", TRICKY[:3])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    b = _write_pool(tmp_path / "b.txt", TRICKY[3:])
    pool = rc.TextPool([a, empty, b])
    assert [pool[i] for i in range(len(pool))] == TRICKY


def test_text_pool_from_list_skips_blanks():
    pool = rc.TextPool(["a", "", "  ", "b"])
    assert len(pool) == 2 and [pool[0], pool[1]] == ["a", "b"]


def test_text_pool_sample_is_uniform_and_seeded(tmp_path):
    pool = rc.TextPool(_write_pool(tmp_path / "p.txt", [f"p{i}" for i in range(8)]))
    a = pool.sample(16_000, torch.Generator().manual_seed(0))
    assert a == pool.sample(16_000, torch.Generator().manual_seed(0))
    counts = [a.count(f"p{i}") for i in range(8)]
    assert stats.chisquare(counts).pvalue > 1e-3


def test_text_pool_index_is_reused_then_rebuilt_on_change(tmp_path):
    path = _write_pool(tmp_path / "p.txt", ["one", "two"])
    rc.TextPool(path)
    [index] = _indexes(tmp_path)
    first = index.stat()
    assert len(rc.TextPool(path)) == 2
    assert _indexes(tmp_path) == [index] and index.stat().st_ino == first.st_ino  # reused, not rewritten
    with open(path, "a", encoding="utf-8") as f:  # size changes
        f.write("\nthree\nfour")
    pool = rc.TextPool(path)
    assert len(pool) == 4 and pool[3] == "four"
    [index] = _indexes(tmp_path)  # the stale index is gone
    path.write_text("ab\ncd")  # same size as below, other line breaks: only the mtime tells
    rc.TextPool(path)
    path.write_text("abc\nd")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    pool = rc.TextPool(path)
    assert [pool[0], pool[1]] == ["abc", "d"]
    assert len(_indexes(tmp_path)) == 1 and not list(tmp_path.glob("*.tmp"))


def test_text_pool_keeps_the_index_of_a_file_with_a_similar_name(tmp_path):
    rc.TextPool(_write_pool(tmp_path / "p.txt.old", ["x"]))
    rc.TextPool(_write_pool(tmp_path / "p.txt", ["y"]))
    assert len(_indexes(tmp_path)) == 2


def test_text_pool_cache_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = _write_pool(src / "p.txt", ["one", "two"])
    cache = tmp_path / "cache"
    pool = rc.TextPool(path, cache_dir=cache)
    assert len(pool) == 2 and pool[1] == "two"
    assert not _indexes(src) and len(_indexes(cache)) == 1
    other = _write_pool(tmp_path / "p.txt", ["three"])  # same name, other folder: its own index
    assert rc.TextPool(other, cache_dir=cache)[0] == "three" and rc.TextPool(path, cache_dir=cache)[0] == "one"
    assert len(_indexes(cache)) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not bind root")
def test_text_pool_read_only_folder_puts_the_index_in_the_user_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    path = _write_pool(data / "p.txt", ["one", "two"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data.chmod(0o555)
    try:
        pool = rc.TextPool(path)
        assert [pool[0], pool[1]] == ["one", "two"]
        assert not _indexes(data) and len(_indexes(tmp_path / "xdg" / "randcond")) == 1
    finally:
        data.chmod(0o755)


def test_text_pool_temporary_index_name_carries_host_pid_and_a_random_part(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    # Audit hooks see every open() with its path; a child process keeps this one out of the test run.
    child = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import randcond\n"
        "sys.addaudithook(lambda ev, args: ev == 'open' and str(args[0]).endswith('.tmp') and print(args[0]))\n"
        "for name in ('a.txt', 'b.txt'):\n"
        "    p = Path(sys.argv[2]) / name; p.write_text('x'); randcond.TextPool(p)\n"
    )
    out = subprocess.run([sys.executable, "-c", child, str(ROOT), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    names = [Path(line).name for line in out.stdout.split()]
    assert len(names) == 2
    suffixes = [name.split(".rcidx.")[1] for name in names]
    for suffix in suffixes:
        host, pid, token = suffix.removesuffix(".tmp").rsplit("-", 2)
        assert host == socket.gethostname() and pid.isdigit() and len(token) == 8
    assert suffixes[0].rsplit("-", 1)[1] != suffixes[1].rsplit("-", 1)[1]
    assert not list(tmp_path.glob("*.tmp"))


def test_text_pool_pickles_for_workers(tmp_path):
    a = _write_pool(tmp_path / "a.txt", [f"p{i}" for i in range(5)])
    b = _write_pool(tmp_path / "b.txt", [f"p{i}" for i in range(5, 10)])
    for pool in (rc.TextPool([a, b]), rc.TextPool([f"p{i}" for i in range(10)])):
        clone = pickle.loads(pickle.dumps(pool))
        assert [clone[i] for i in range(len(clone))] == [f"p{i}" for i in range(10)]


def test_text_pool_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        rc.TextPool(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="not a file"):
        rc.TextPool(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="empty.*empty.txt"):
        rc.TextPool(empty)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\n\xff\xfe broken\nok\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 3 is not valid UTF-8") as err:
        rc.TextPool(bad)
    assert "\n" not in str(err.value)
    packed = tmp_path / "pool.txt.gz"
    with gzip.open(packed, "wt") as f:
        f.write("a cat\n")
    with pytest.raises(ValueError, match=r"pool.txt.gz: compressed .* gunzip") as err:
        rc.TextPool(packed)
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError):
        rc.TextPool([1, 2])


# --- losses


def test_output_kd_loss_is_float32_mse():
    a = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    b = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    loss = rc.output_kd_loss(a, b)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(((a.float() - b.float()) ** 2).mean().item(), rel=1e-6)


class Block(nn.Module):
    """Returns a tuple like a diffusers down block."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return h, (h,)


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.down = Block(3, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 3, 1)

    def forward(self, x):
        h, _ = self.down(x)
        return self.out(self.mid(h))


def _hook_count(*models):
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


def test_feature_distiller_projections_hooks_and_gradients():
    torch.manual_seed(0)
    teacher, student = Net(16), Net(8)
    distiller = rc.FeatureDistiller(teacher, student, ["down", "mid"])
    x = torch.randn(2, 3, 8, 8)
    distiller.probe(x)
    distiller.probe(x)  # idempotent
    assert set(distiller.proj.keys()) == {"down", "mid"}
    assert distiller.proj["down"].weight.shape == (16, 8, 1, 1)
    assert sum(p.numel() for p in distiller.parameters()) == 2 * (16 * 8 + 16)  # only the projections
    assert _hook_count(teacher, student) == 0
    with distiller:
        assert _hook_count(teacher, student) == 4
        with torch.no_grad():
            teacher(x)
        student(x)
        loss = distiller.loss()
    assert _hook_count(teacher, student) == 0
    assert loss.dtype == torch.float32 and loss.item() > 0
    loss.backward()
    for p in list(distiller.parameters()) + list(student.parameters())[:2]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # activations are not kept between steps
    with distiller, pytest.raises(RuntimeError, match="no student activation for 'down'"):
        distiller.loss()


def test_feature_distiller_matches_manual_loss_and_maps_names():
    torch.manual_seed(0)
    teacher, student = Net(8), Net(8)
    distiller = rc.FeatureDistiller(teacher, student, {"mid": "mid", "down": "down"})
    x = torch.randn(2, 3, 8, 8)
    with distiller:
        teacher(x)
        student(x)
        loss = distiller.loss()
    assert len(distiller.proj) == 0
    with distiller:
        teacher(x)
        student(x)
        s_feats, t_feats = distiller.features()
        assert [f.shape for f in s_feats] == [f.shape for f in t_feats] == [(2, 8, 8, 8)] * 2
        assert not t_feats[0].requires_grad and s_feats[0].requires_grad
    t_down, s_down = teacher.down(x)[0], student.down(x)[0]
    manual = ((s_down - t_down) ** 2).mean() + ((student.mid(s_down) - teacher.mid(t_down)) ** 2).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_feature_distiller_hooks_removed_on_error_and_bad_names():
    teacher, student = Net(8), Net(4)
    distiller = rc.FeatureDistiller(teacher, student, ["down"])
    with pytest.raises(KeyboardInterrupt):
        with distiller:
            raise KeyboardInterrupt
    assert _hook_count(teacher, student) == 0
    with distiller:
        with pytest.raises(RuntimeError, match="do not nest"):
            distiller.__enter__()
        assert _hook_count(teacher, student) == 2
    assert _hook_count(teacher, student) == 0
    with pytest.raises(ValueError, match="student has no module named 'nope'"):
        rc.FeatureDistiller(teacher, student, ["nope"])


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank
    teacher, student = Net(16), Net(8)
    distiller = rc.FeatureDistiller(teacher, student, ["down", "mid"])
    distiller.probe(torch.randn(1, 3, 8, 8))

    class Trained(nn.Module):  # one module holds every trainable parameter
        def __init__(self):
            super().__init__()
            self.student, self.distiller = student, distiller

        def forward(self, x):
            return self.student(x)

    model = nn.parallel.DistributedDataParallel(Trained())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g)
        with distiller:
            with torch.no_grad():
                teacher_pred = teacher(x)
            loss = rc.output_kd_loss(model(x), teacher_pred) + distiller.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({k: v for k, v in model.module.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_feature_distiller_under_ddp_keeps_ranks_identical(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert any(k.startswith("distiller.proj.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(0)
    Net(16)
    initial = Net(8)
    assert not torch.equal(a["student.mid.weight"], initial.mid.weight.detach())  # it did train


# --- relational loss


def _softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def _rdd_by_loops(s, t, tau=1.0):
    """RDD's Intra_sample_p2p_loss written out row by row, in float64: s, t (B, C, H, W), no pooling."""
    B, N = s.shape[0], s.shape[2] * s.shape[3]

    def unit_vectors(x):  # [b][i] -> the channel vector at position i of sample b, L2-normalised
        x = x.double().flatten(2)
        return [[x[b, :, i] / x[b, :, i].norm() for i in range(N)] for b in range(B)]

    fs, ft = unit_vectors(s), unit_vectors(t)
    total = 0.0
    for b in range(B):
        for d in range(B):  # every ordered pair, b == d included
            for i in range(N):
                p_s = _softmax([float(fs[b][i] @ fs[d][j]) / tau for j in range(N)])
                p_t = _softmax([float(ft[b][i] @ ft[d][j]) / tau for j in range(N)])
                total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return total / (B * B * N)


def test_relational_loss_is_rdd_without_pooling():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 8, 4, 4, generator=g)
    assert rc.relational_kd_loss(s, t).item() == pytest.approx(_rdd_by_loops(s, t), rel=1e-5)
    s5 = torch.randn(4, 5, 4, 4, generator=g)  # other channel count, other temperature
    assert rc.relational_kd_loss(s5, t, tau=0.5).item() == pytest.approx(_rdd_by_loops(s5, t, 0.5), rel=1e-5)


def test_relational_loss_pools_to_max_tokens_first():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 6, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    pooled = _rdd_by_loops(nn.functional.avg_pool2d(s, 2), nn.functional.avg_pool2d(t, 2))  # 4 x 4 positions
    assert rc.relational_kd_loss(s, t, max_tokens=16).item() == pytest.approx(pooled, rel=1e-5)
    assert rc.relational_kd_loss(s, t, max_tokens=64).item() == pytest.approx(_rdd_by_loops(s, t), rel=1e-5)
    tokens = t.flatten(2).transpose(1, 2)  # (B, N, C) features: 64 positions pooled in fours along N
    pooled_tokens = nn.functional.avg_pool1d(tokens.transpose(1, 2), 4).unsqueeze(-1)  # (B, C, 16, 1)
    expected = _rdd_by_loops(pooled_tokens, pooled_tokens.flip(0))
    assert rc.relational_kd_loss(tokens, tokens.flip(0), max_tokens=16).item() == pytest.approx(expected, rel=1e-5)


def test_relational_loss_zero_for_identical_gradient_to_the_student_only():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, 16, 8, 8, generator=g, requires_grad=True)
    assert rc.relational_kd_loss(t.detach().clone(), t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(6, 4, 8, 8, generator=g, requires_grad=True)
    loss = rc.relational_kd_loss([s, s], [t, t])  # two layers: summed
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2 * rc.relational_kd_loss(s, t).item(), rel=1e-6) and loss.item() > 0
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="differ in batch or positions"):
        rc.relational_kd_loss(s, t[:5])


def _saved_bytes(batch: int, size: int, max_tokens: int = 64) -> int:
    """Bytes autograd keeps for one relational loss on (batch, 16, size, size) features, not counting
    references to the caller's own input."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(batch, 16, size, size, generator=g, requires_grad=True)
    t = torch.randn(batch, 16, size, size, generator=g)
    saved = {}

    def pack(x):
        if x.untyped_storage().data_ptr() != s.untyped_storage().data_ptr():
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()  # each storage once
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = rc.relational_kd_loss(s, t, max_tokens=max_tokens)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    return sum(saved.values())


def test_relational_loss_memory_at_batch_64_is_capped_by_max_tokens():
    saved_64 = _saved_bytes(64, 64)
    # 64 x 64 and 32 x 32 maps are both pooled to 8 x 8 positions: what autograd keeps does not grow
    # with the map, and stays far below 1 GB (two (64, 64, 64, 64) float32 tensors of 64 MiB each)
    assert saved_64 == _saved_bytes(64, 32)
    assert saved_64 < 2**30 / 4
    assert saved_64 >= 2 * 64**4 * 4  # the softmax outputs are kept: B^2 N^2 each
    assert _saved_bytes(4, 32, max_tokens=256) > 8 * _saved_bytes(4, 32)  # the bound is what caps it


_OPEN_AT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import randcond
from pathlib import Path
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # all processes open at the same moment
pool = randcond.TextPool(Path(sys.argv[2]))
print(len(pool), pool[0], pool[len(pool) - 1], pool[len(pool) // 2])
"""


@pytest.mark.slow
def test_text_pool_indexed_by_several_processes_at_once(tmp_path):
    import subprocess
    import sys
    import time

    from conftest import ROOT

    n = 300_000
    path = tmp_path / "pool.txt"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"prompt number {i} of the pool\n" for i in range(n))
    start = time.time() + 8  # after the interpreters and torch have started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT, str(ROOT), str(path), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    expected = f"{n} prompt number 0 of the pool prompt number {n - 1} of the pool prompt number {n // 2} of the pool"
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == expected
    assert len(list(tmp_path.glob("*.rcidx"))) == 1 and not list(tmp_path.glob("*.tmp"))
