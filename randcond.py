"""randcond: Random Conditioning for diffusion model distillation.

Kim, Park, Han, Kim, Seo, "Random Conditioning for Diffusion Model Compression with Distillation",
CVPR 2025 (arXiv 2504.02011).

A student denoiser learns to copy a teacher on noised images. Most of the time each image keeps its
own condition, but with a probability p(t) that grows with the noise level the condition is swapped
for a random one from a large pool (a text prompt, or a class label). At high noise the image barely
constrains the output, so the swapped pair is still a valid lesson, and the student learns the
teacher's behaviour for conditions it never saw an image of.

Everything the method is lives here, on torch and the standard library only. A training step reads:

    timesteps = torch.randint(0, T, (B,), generator=g)
    conditions, paired = conditioner(conditions, timesteps, generator=g)
    with distiller:                                          # hooks on
        teacher_pred = teacher(noisy_latents, timesteps, conditions)
        model_pred = student(noisy_latents, timesteps, conditions)
        loss = lambda_out * output_kd_loss(model_pred, teacher_pred) + lambda_feat * distiller.loss()
"""

from __future__ import annotations

import bisect
import hashlib
import math
import mmap
import os
import re
import secrets
import socket
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# -----------------------------------------------------------------------------
# p(t): the probability of replacing a sample's condition at timestep t, as a function of s = t/T

_P_OF_S = {
    "exp": lambda s, lam: torch.exp(-lam * (1 - s)),  # as published; lam = 5 swaps about 20% of samples
    "sigmoid": lambda s, lam: torch.sigmoid(20 * (s - 0.7)),  # variant in the public code, about 30%
    "two_sided": lambda s, lam: torch.maximum(torch.exp(-lam * (1 - s)), torch.exp(-lam * s)),  # high at both ends
    "constant": lambda s, lam: torch.full_like(s, lam),  # lam read as the probability, in [0, 1]
    "none": lambda s, lam: torch.zeros_like(s),  # no random conditioning
}
SCHEDULES = tuple(_P_OF_S)


def replace_prob(timesteps: Tensor, num_train_timesteps: int = 1000, schedule: str = "exp", lam: float = 5.0) -> Tensor:
    """p(t) for integer timesteps t in [0, T-1] (T = num_train_timesteps), float32, the shape of timesteps.
    The formula of each schedule, in s = t/T, is in the table above; "exp" with lam = 5 is the paper's."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if schedule == "constant" and not 0.0 <= lam <= 1.0:
        raise ValueError(f"schedule 'constant' reads lam as a probability in [0, 1], got {lam}")
    if schedule in ("exp", "two_sided") and lam < 0:
        raise ValueError(f"lam must be >= 0 for schedule {schedule!r}, got {lam}")
    timesteps = torch.as_tensor(timesteps)
    if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() > num_train_timesteps - 1):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps - 1}]")
    s = timesteps.double() / num_train_timesteps  # float64, so that p(0) = exp(-5) is not rounded
    return _P_OF_S[schedule](s, lam).float()


# -----------------------------------------------------------------------------
# The selector: which condition each sample is trained with
def _draw(fn, *args, generator: torch.Generator | None) -> Tensor:
    # Draws happen on the generator's device (CPU by default) so a seed gives the same batch on any
    # accelerator; the tensors are tiny (one number per sample) and moved to the CPU afterwards.
    device = generator.device if generator is not None else "cpu"
    return fn(*args, generator=generator, device=device).cpu()


def random_condition_mask(
    timesteps: Tensor,
    num_train_timesteps: int = 1000,
    schedule: str = "exp",
    lam: float = 5.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One Bernoulli(p(t)) draw per sample: True where the condition is replaced. Shape of timesteps."""
    timesteps = torch.as_tensor(timesteps)
    p = replace_prob(timesteps.cpu(), num_train_timesteps, schedule, lam)
    return (_draw(torch.rand, p.shape, generator=generator) < p).to(timesteps.device)


class RandomConditioner:
    """Select the condition each sample is trained with, as published: (1) with probability p(t),
    replace it by a uniform draw from the pool (paired = False, else True); (2) then, independently,
    with probability null_prob, set the null condition (for classifier-free guidance), paired unchanged.

    Prompts: conditions is a list of str, pool a TextPool or a list of str, null condition "".
    Labels:  conditions is a LongTensor (B,), pool an int K (labels 0..K-1) or a LongTensor of
             allowed labels, null_condition the id of the null label (required, e.g. K).
    """

    def __init__(
        self,
        pool: TextPool | Sequence[str] | int | Tensor,
        num_train_timesteps: int = 1000,
        schedule: str = "exp",
        lam: float = 5.0,
        null_prob: float = 0.1,
        null_condition: str | int | None = None,
    ):
        replace_prob(torch.zeros(1, dtype=torch.long), num_train_timesteps, schedule, lam)  # validates
        if not 0.0 <= null_prob <= 1.0:
            raise ValueError(f"null_prob must be in [0, 1], got {null_prob}")
        self.num_train_timesteps = num_train_timesteps
        self.schedule, self.lam, self.null_prob = schedule, lam, null_prob
        self.class_labels = isinstance(pool, (int, Tensor))
        if self.class_labels:
            self.pool = torch.arange(pool) if isinstance(pool, int) else pool.long().flatten().cpu()
            if len(self.pool) == 0 or null_condition is None:
                raise ValueError("class labels need a non-empty pool and null_condition, the id of the null label")
        else:
            self.pool = pool if isinstance(pool, TextPool) else TextPool(list(pool))
        self.null_condition = "" if null_condition is None else null_condition

    def __call__(
        self, conditions: Sequence[str] | Tensor, timesteps: Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[str] | Tensor, Tensor]:
        """Return (selected conditions, paired) with paired a BoolTensor (B,) on timesteps' device."""
        B = len(conditions)
        if B != len(timesteps):
            raise ValueError(f"{B} conditions but {len(timesteps)} timesteps")
        replace = random_condition_mask(timesteps, self.num_train_timesteps, self.schedule, self.lam, generator).cpu()
        draw = _draw(torch.randint, len(self.pool), (B,), generator=generator)  # a pool index per sample
        null = _draw(torch.rand, B, generator=generator) < self.null_prob
        if self.class_labels:  # (B,) label ids, vectorised
            selected = torch.where(replace, self.pool[draw], conditions.cpu())
            selected = torch.where(null, torch.full_like(selected, self.null_condition), selected)
            selected = selected.to(conditions.device)
        else:
            selected = [
                self.null_condition if z else (self.pool[int(j)] if r else c)
                for c, r, j, z in zip(conditions, replace.tolist(), draw.tolist(), null.tolist())
            ]
        return selected, (~replace).to(timesteps.device)


# -----------------------------------------------------------------------------
# Distillation losses
def output_kd_loss(student_pred: Tensor, teacher_pred: Tensor) -> Tensor:
    """L_out = mean((student_pred - teacher_pred)^2), computed in float32; any matching shapes."""
    return F.mse_loss(student_pred.float(), teacher_pred.detach().float())


Feats = Tensor | Sequence[Tensor]  # one layer's (B, C, H, W) or (B, N, C) features, or a list of layers


def _pool_tokens(x: Tensor, max_tokens: int) -> Tensor:
    """(B, C, H, W) or (B, N, C) -> (B, N', C) with N' <= max_tokens, by average pooling (a no-op if N fits)."""
    if x.dim() == 3:
        return F.adaptive_avg_pool1d(x.transpose(1, 2), min(x.shape[1], max_tokens)).transpose(1, 2)
    if x.dim() != 4:
        raise ValueError(f"relational_kd_loss takes (B, C, H, W) or (B, N, C) features, got shape {tuple(x.shape)}")
    H, W = x.shape[2:]
    f = math.ceil(math.sqrt(H * W / max_tokens))  # pooling factor per side, 1 when H * W <= max_tokens
    return F.adaptive_avg_pool2d(x, (max(1, H // f), max(1, W // f))).flatten(2).transpose(1, 2)


def relational_kd_loss(student_feats: Feats, teacher_feats: Feats, tau: float = 1.0, max_tokens: int = 64) -> Tensor:
    """Relational loss of Relational Diffusion Distillation (arXiv 2410.07679), as the authors'
    `Intra_sample_p2p_loss`. Features are average-pooled to at most max_tokens positions, then
    L2-normalised over channels: f_b(i) at position i of sample b. For every ordered pair of samples
    (b, d), b = d included, S[b, d, i, j] = <f_b(i), f_d(j)> / tau; each of the B*B*N rows (b, d, i)
    gets a softmax over j, and the loss is KL(teacher || student):
        L = sum_{b,d,i,j} p_t[b,d,i,j] (log p_t[b,d,i,j] - log p_s[b,d,i,j]) / (B * B * N)
    Teacher detached; channel counts may differ; lists (one tensor per layer) are summed; float32.
    Memory grows as B^2 N^2: at the default 64 positions and batch 64, a layer keeps 129 MiB for the
    backward and peaks under 0.5 GB (measured on CPU; each (B, B, N, N) float32 tensor is 64 MiB).
    """
    if isinstance(student_feats, Tensor):
        student_feats, teacher_feats = [student_feats], [teacher_feats]
    return sum(_rdd_loss(s, t, tau, max_tokens) for s, t in zip(student_feats, teacher_feats, strict=True))


def _rdd_loss(s: Tensor, t: Tensor, tau: float, max_tokens: int) -> Tensor:
    s = F.normalize(_pool_tokens(s.float(), max_tokens), dim=-1)  # (B, N, Cs)
    t = F.normalize(_pool_tokens(t.detach().float(), max_tokens), dim=-1)  # (B, N, Ct)
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(f"student {tuple(s.shape[:2])} and teacher {tuple(t.shape[:2])} differ in batch or positions")
    log_ps = F.log_softmax(torch.einsum("bic,djc->bdij", s, s) / tau, dim=-1)  # (B, B, N, N)
    log_pt = F.log_softmax(torch.einsum("bic,djc->bdij", t, t) / tau, dim=-1)
    # "batchmean" divides the sum by the number of rows, B * B * N
    return F.kl_div(log_ps.flatten(0, 2), log_pt.flatten(0, 2), reduction="batchmean", log_target=True)


# -----------------------------------------------------------------------------
# FeatureDistiller: feature distillation through forward hooks
def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the model in .module, torch.compile in ._orig_mod.
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


class FeatureDistiller(nn.Module):
    """Feature distillation through forward hooks.

    L_feat = sum over hooked layers l of mean((P_l(student_l) - teacher_l)^2), float32, teacher detached,
    where P_l maps student to teacher channels where they differ (else identity): a 1x1 convolution on
    (B, C, H, W) maps, a linear layer on (B, N, C) token sequences (attention outputs, SD 2 / SDXL proj_out).

    layers: module names present in both models, or a dict student name -> teacher name.
    Hooks are live only inside `with distiller:` and are removed on exit. The projections are this
    module's own parameters: put the distiller inside the module you wrap in DDP (next to the student)
    so one forward sees every trainable parameter, and leave it out when you export the student.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[str] | Mapping[str, str]):
        super().__init__()
        self.pairs = dict(layers) if isinstance(layers, Mapping) else {name: name for name in layers}
        if not self.pairs:
            raise ValueError("FeatureDistiller needs at least one layer")
        # Kept in a plain tuple so they are not registered as submodules: parameters() are the projections.
        self._models = teacher, student = _unwrap(teacher), _unwrap(student)
        for role, model, names in [("student", student, self.pairs), ("teacher", teacher, self.pairs.values())]:
            modules = dict(model.named_modules())
            for name in names:
                if name not in modules:
                    raise ValueError(f"the {role} has no module named {name!r}")
        self.proj = nn.ModuleDict()  # key: student name with '.' -> '__' (ModuleDict keys cannot hold dots)
        self._feats: dict[tuple[str, str], Tensor] = {}  # ("student" or "teacher", student layer name)
        self._handles: list = []

    def __enter__(self) -> FeatureDistiller:
        if self._handles:
            raise RuntimeError("this FeatureDistiller is already active: `with distiller:` blocks do not nest")
        teacher, student = self._models
        for s_name, t_name in self.pairs.items():
            self._handles.append(student.get_submodule(s_name).register_forward_hook(self._store("student", s_name)))
            self._handles.append(teacher.get_submodule(t_name).register_forward_hook(self._store("teacher", s_name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _store(self, role: str, name: str):
        def hook(module, args, output):
            feat = output[0] if isinstance(output, tuple) else output  # diffusers down blocks: (h, residuals)
            self._feats[role, name] = feat.detach() if role == "teacher" else feat

        return hook

    def clear(self) -> None:
        self._feats.clear()

    def features(self) -> tuple[list[Tensor], list[Tensor]]:
        """The stored (student, teacher) activations of every layer, unprojected, e.g. for
        relational_kd_loss. Call before loss(), which clears them."""
        for key in [(role, n) for n in self.pairs for role in ("student", "teacher")]:
            if key not in self._feats:
                raise RuntimeError(f"no {key[0]} activation for {key[1]!r}: run both models in `with distiller:`")
        return [self._feats["student", n] for n in self.pairs], [self._feats["teacher", n] for n in self.pairs]

    @torch.no_grad()
    def probe(self, *inputs, **kwargs) -> None:
        """Run teacher and student once on the same inputs; create a projection for every layer whose
        channel counts differ. Call before building the optimizer and DDP, outside `with distiller:`.
        Idempotent."""
        teacher, student = self._models
        with self:
            teacher(*inputs, **kwargs)
            student(*inputs, **kwargs)
            for name, s, t in zip(self.pairs, *self.features()):
                tokens = s.dim() == 3  # (B, N, C) sequences are compared per token, (B, C, H, W) maps per pixel
                c = -1 if tokens else 1  # the channel dimension: only its width may differ, bridged by a projection
                if s.dim() != t.dim() or s.movedim(c, -1).shape[:-1] != t.movedim(c, -1).shape[:-1]:
                    raise ValueError(f"{name!r}: student {tuple(s.shape)}, teacher {tuple(t.shape)}: positions differ")
                key = name.replace(".", "__")
                if s.shape[c] != t.shape[c] and key not in self.proj:
                    layer = nn.Linear(s.shape[c], t.shape[c]) if tokens else nn.Conv2d(s.shape[c], t.shape[c], 1)
                    self.proj[key] = layer.to(s.device)

    def loss(self) -> Tensor:
        """Sum over layers of the float32 MSE between (projected) student and detached teacher features.
        Clears the stored activations, so nothing is kept between steps."""
        student_feats, teacher_feats = self.features()
        self.clear()
        terms = []
        for name, s, t in zip(self.pairs, student_feats, teacher_feats):
            key = name.replace(".", "__")
            if key in self.proj:
                s = self.proj[key](s.to(self.proj[key].weight.dtype))
            elif s.shape != t.shape:
                raise RuntimeError(f"{name!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; call probe()")
            terms.append((s.float() - t.float()).square().mean())  # keeps one float32 difference for backward
        return sum(terms)


# -----------------------------------------------------------------------------
# TextPool: tens of millions of prompts, read by seeking into memory-mapped files
class TextPool:
    """A pool of prompts, from UTF-8 text files (one prompt a line, blank lines skipped) or a list of str.

    TextPool("captions.txt"), TextPool([Path("a.txt"), Path("b.txt")]), TextPool(["a cat", "a dog"])

    For a file, the byte offset of every prompt is stored once in an index file (8 bytes a prompt)
    whose name carries the file's size and mtime, so a changed file gets a new index. Both are
    memory-mapped: opening a 20M-line pool reads no prompt, and a prompt is one slice of the text.
    The index goes to `cache_dir` if given, else beside the file, else (folder not writable) to
    $XDG_CACHE_HOME/randcond. Compressed files are refused: gunzip them first (gzip cannot seek).
    Each rank draws from the whole pool with its own generator (`sample`); it pickles for workers.
    """

    def __init__(self, source: str | os.PathLike | Sequence, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if isinstance(source, (str, os.PathLike)):
            source = [Path(source)]
        paths = len(source) > 0 and all(isinstance(s, os.PathLike) for s in source)
        if not paths and not all(isinstance(s, str) for s in source):
            raise TypeError("TextPool takes a path, a list of paths (pathlib.Path) or a list of prompts (str)")
        self._prompts = None if paths else [s for s in source if s.strip()]
        self._files = [self._index(Path(s)) for s in source] if paths else []  # (text file, index file)
        self._open()
        if len(self) == 0:
            where = ", ".join(str(t) for t, _ in self._files) or "the given list"
            raise ValueError(f"text pool is empty: no non-blank prompt in {where}")

    def _index_path(self, path: Path) -> Path:
        st = path.stat()
        name = f"{path.name}.{st.st_size}-{st.st_mtime_ns}.rcidx"
        if self.cache_dir is None and (os.access(path.parent, os.W_OK) or (path.parent / name).is_file()):
            return path.parent / name
        folder = self.cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "randcond"
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]  # same name, other folder: other index
        return folder / f"{digest}-{name}"

    def _index(self, path: Path) -> tuple[Path, Path]:
        """Return (text file, index file), building the index if it is missing or stale."""
        if not path.is_file():
            raise FileNotFoundError(f"text pool file not found (or not a file): {path}")
        if path.suffix in (".gz", ".bz2", ".xz", ".zst"):
            raise ValueError(f"{path}: compressed text pools are not read; decompress it first (e.g. gunzip)")
        index = self._index_path(path)  # before the scan: a file changed meanwhile is indexed again next time
        if index.is_file():  # complete: it was renamed into place once written
            return path, index
        offsets = _scan_offsets(path)
        index.parent.mkdir(parents=True, exist_ok=True)
        # Ranks, possibly on other hosts sharing the folder, may build at once: each writes its own file.
        tmp = index.with_name(f"{index.name}.{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:
                offsets.tofile(f)
            os.replace(tmp, index)
        finally:
            tmp.unlink(missing_ok=True)
        stem = index.name.removesuffix(".rcidx").rsplit(".", 1)[0]  # the name without size and mtime
        stale = re.compile(re.escape(stem) + r"\.\d+-\d+\.rcidx")
        for old in index.parent.iterdir():  # indexes of earlier versions of the file
            if old != index and stale.fullmatch(old.name):
                old.unlink(missing_ok=True)
        return path, index

    def _open(self) -> None:
        self._maps: list[tuple[mmap.mmap, memoryview]] = []  # (text, offsets) of each non-empty file
        self._starts = [0]  # number of prompts before each file, then the total
        for text, index in self._files:
            if index.stat().st_size == 0:
                continue  # no prompt (and mmap cannot map an empty file)
            with open(index, "rb") as f:
                offsets = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)).cast("Q")
            with open(text, "rb") as f:
                self._maps.append((mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), offsets))
            self._starts.append(self._starts[-1] + len(offsets))

    # Memory maps do not pickle; DataLoader workers and spawned processes reopen them.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._prompts) if self._prompts is not None else self._starts[-1]

    def __getitem__(self, i: int) -> str:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"prompt index {i} out of range for a pool of {n}")
        i %= n
        if self._prompts is not None:
            return self._prompts[i]
        k = bisect.bisect_right(self._starts, i) - 1  # which file
        text, offsets = self._maps[k]
        start = offsets[i - self._starts[k]]
        end = text.find(b"\n", start)
        return text[start : end if end >= 0 else len(text)].rstrip(b"\r").decode("utf-8")

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n prompts drawn uniformly with replacement."""
        return [self[i] for i in _draw(torch.randint, len(self), (n,), generator=generator).tolist()]


def _scan_offsets(path: Path) -> array:
    """Byte offset of every non-blank line, each checked to be UTF-8."""
    offsets, pos = array("Q"), 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason})") from None
                offsets.append(pos)
            pos += len(line)
    return offsets
