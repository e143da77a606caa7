"""
randcond: Random Conditioning for diffusion model distillation.

Kim, Park, Han, Kim, Seo, "Random Conditioning for Diffusion Model Compression with Distillation",
CVPR 2025 (arXiv 2504.02011).

A student denoiser learns to copy a teacher on noised images. Most of the time each image keeps its
own condition, but with a probability p(t) that grows with the noise level the condition is swapped
for a random one from a large pool (a text prompt, or a class label). At high noise the image barely
constrains the output, so the swapped pair is still a valid lesson, and the student learns the
teacher's behaviour for conditions it never saw an image of.

Everything the method is lives here and depends on torch and the standard library only:

    replace_prob / random_condition_mask   p(t) and one Bernoulli(p(t)) draw per sample
    TextPool                               a memory-mapped pool of tens of millions of prompts
    RandomConditioner                      the per-batch selection: swap, then null-drop
    output_kd_loss                         MSE between noise predictions (float32)
    FeatureDistiller                       block-feature MSE through forward hooks, with projections
    relational_kd_loss                     optional cross-sample relational loss (RDD)

A training step reads:

    timesteps = torch.randint(0, T, (B,), generator=g)
    conditions, paired = conditioner(conditions, timesteps, generator=g)
    with distiller:                                          # hooks on
        teacher_pred = teacher(noisy_latents, timesteps, conditions)
        model_pred = student(noisy_latents, timesteps, conditions)
        loss = lambda_out * output_kd_loss(model_pred, teacher_pred) + lambda_feat * distiller.loss()
"""

from __future__ import annotations

import bisect
import copy
import gzip
import hashlib
import math
import mmap
import os
import struct
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# -----------------------------------------------------------------------------
# p(t): the probability of replacing a sample's condition at timestep t

SCHEDULES = ("exp", "sigmoid", "two_sided", "constant", "none")


def replace_prob(timesteps: Tensor, num_train_timesteps: int = 1000, schedule: str = "exp", lam: float = 5.0) -> Tensor:
    """p(t) for integer timesteps t in [0, T-1]; returns a float tensor of the same shape.

    exp        p = exp(-lam * (1 - t/T))                      as published (lam = 5: ~20% swapped)
    sigmoid    p = 1 / (1 + exp(-20 * (t/T - 0.7)))           variant in the public code (~30%)
    two_sided  p = max(exp(-lam (1 - t/T)), exp(-lam t/T))    high at both ends
    constant   p = lam                                        lam read as the probability (0..1)
    none       p = 0                                          no random conditioning
    """
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
    s = timesteps.double() / num_train_timesteps  # t/T in [0, 1); float64 so p(0) is not rounded
    if schedule == "exp":
        p = torch.exp(-lam * (1 - s))
    elif schedule == "sigmoid":
        p = torch.sigmoid(20 * (s - 0.7))
    elif schedule == "two_sided":
        p = torch.maximum(torch.exp(-lam * (1 - s)), torch.exp(-lam * s))
    elif schedule == "constant":
        p = torch.full_like(s, lam)
    else:
        p = torch.zeros_like(s)
    return p.float()


def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    # Draws happen on the generator's device (CPU by default) so a seed gives the same batch on any
    # accelerator; the tensors are tiny (one number per sample) and moved afterwards.
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device).cpu()


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
    return (_rand(p.numel(), generator).view(p.shape) < p).to(timesteps.device)


# -----------------------------------------------------------------------------
# TextPool: tens of millions of prompts, read by seeking into memory-mapped files

_MAGIC = b"RCPOOL01"
_HEADER = struct.Struct("<8sQQQ")  # magic, source size, source mtime_ns, number of prompts


class TextPool:
    """A pool of prompts: from UTF-8 text files (one prompt per line, blank lines skipped, .txt or
    .gz) or from an in-memory list of strings.

    TextPool("captions.txt"), TextPool([Path("a.txt"), Path("b.txt.gz")]), TextPool(["a cat", "a dog"])

    For files, the byte offset of every prompt is stored once in an index file (8 bytes a prompt)
    beside the text file, or in `cache_dir`, and rebuilt when the file's size or mtime changes.
    Both files are memory-mapped: opening a 20M-line pool reads only the header, and a prompt is one
    slice of the text. A .gz file is decompressed once into the cache (gzip cannot seek).
    """

    def __init__(self, source: str | os.PathLike | Sequence, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._prompts: list[str] | None = None
        self._files: list[tuple[Path, Path]] = []  # (text file, index file)
        if isinstance(source, (str, os.PathLike)):
            paths = [Path(source)]
        elif len(source) and all(isinstance(s, os.PathLike) for s in source):
            paths = [Path(s) for s in source]
        elif all(isinstance(s, str) for s in source):
            paths = []
            self._prompts = [s for s in source if s.strip()]
        else:
            raise TypeError("TextPool takes a path, a list of paths (pathlib.Path) or a list of prompts (str)")
        for path in paths:
            self._files.append(self._index(path))
        self._open()
        self._start, self._stop = 0, self._total
        if self._total == 0:
            where = ", ".join(str(p) for p in paths) or "the given list"
            raise ValueError(f"text pool is empty: no non-blank prompt in {where}")

    # --- building and opening the index

    def _cache_path(self, path: Path, suffix: str) -> Path:
        if self.cache_dir is None:
            return path.with_name(path.name + suffix)
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        return self.cache_dir / f"{path.name}.{digest}{suffix}"

    def _index(self, path: Path) -> tuple[Path, Path]:
        """Return (text file to read, index file), building either if missing or stale."""
        if not path.is_file():
            raise FileNotFoundError(f"text pool file not found: {path}")
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        text = path
        if path.suffix == ".gz":
            text = self._cache_path(path, ".rctxt")
            if not _fresh(text, path):
                tmp = text.with_name(f"{text.name}.{os.getpid()}.tmp")  # ranks may unpack at once
                with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 24):
                        dst.write(chunk)
                st = path.stat()
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # ties the copy to its source
                os.replace(tmp, text)
        index = self._cache_path(path, ".rcidx")
        st = text.stat()
        if index.is_file():
            with open(index, "rb") as f:
                head = f.read(_HEADER.size)
            if len(head) == _HEADER.size and _HEADER.unpack(head)[:3] == (_MAGIC, st.st_size, st.st_mtime_ns):
                return text, index
        offsets = _scan_offsets(text, shown_name=path)
        tmp = index.with_name(f"{index.name}.{os.getpid()}.tmp")  # ranks may build at once: replace atomically
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, st.st_size, st.st_mtime_ns, len(offsets)))
            offsets.tofile(f)
        os.replace(tmp, index)
        return text, index

    def _open(self) -> None:
        self._maps: list[tuple[mmap.mmap, memoryview]] = []
        self._cum = [0]  # prompts before each file
        if self._prompts is not None:
            self._cum.append(len(self._prompts))
        for text, index in self._files:
            with open(index, "rb") as f:
                count = _HEADER.unpack(f.read(_HEADER.size))[3]
                idx_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if count else None
            with open(text, "rb") as f:
                text_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if count else None
            offsets = memoryview(idx_map)[_HEADER.size :].cast("Q") if count else memoryview(b"").cast("Q")
            self._maps.append((text_map, offsets))
            self._cum.append(self._cum[-1] + count)
        self._total = self._cum[-1]

    # Memory maps do not pickle; DataLoader workers and spawned processes reopen them.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_maps"]
        return state

    def __setstate__(self, state):
        start, stop = state["_start"], state["_stop"]
        self.__dict__.update(state)
        self._open()
        self._start, self._stop = start, stop

    # --- access

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, i: int) -> str:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"prompt index {i} out of range for a pool of {n}")
        i = self._start + (i % n)
        if self._prompts is not None:
            return self._prompts[i]
        k = bisect.bisect_right(self._cum, i) - 1  # which file
        text, offsets = self._maps[k]
        start = offsets[i - self._cum[k]]
        end = text.find(b"\n", start)
        line = text[start : end if end >= 0 else len(text)]
        return line.rstrip(b"\r").decode("utf-8")

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """n prompts drawn uniformly with replacement."""
        device = generator.device if generator is not None else "cpu"
        idx = torch.randint(len(self), (n,), generator=generator, device=device)
        return [self[i] for i in idx.tolist()]

    def shard(self, rank: int, world_size: int) -> TextPool:
        """The rank-th of world_size contiguous, disjoint slices that together cover the pool."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        n = len(self)
        if n < world_size:
            raise ValueError(f"a pool of {n} prompts cannot be split over {world_size} ranks")
        part = copy.copy(self)
        part._start = self._start + rank * n // world_size
        part._stop = self._start + (rank + 1) * n // world_size
        return part

    def __repr__(self) -> str:
        files = ", ".join(str(t) for t, _ in self._files) or "in memory"
        return f"TextPool({len(self)} prompts, {files})"


def _fresh(copy_path: Path, source: Path) -> bool:
    return copy_path.is_file() and copy_path.stat().st_mtime_ns == source.stat().st_mtime_ns


def _scan_offsets(path: Path, shown_name: Path) -> array:
    """Byte offset of every non-blank line; checks UTF-8 a block at a time (fast) and, on a failure,
    line by line to name the line."""
    offsets = array("Q")
    pos, lineno = 0, 0
    with open(path, "rb") as f:
        while lines := f.readlines(1 << 22):
            try:
                b"".join(lines).decode("utf-8")
            except UnicodeDecodeError:
                for k, line in enumerate(lines, lineno + 1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{shown_name}: line {k} is not valid UTF-8 ({e.reason})") from None
            for line in lines:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
            lineno += len(lines)
    return offsets


# -----------------------------------------------------------------------------
# RandomConditioner: which condition each sample is trained with


class RandomConditioner:
    """Select the condition each sample is trained with, as published:

    1. with probability p(t), replace the sample's condition by a uniform draw from the pool
       (paired = False; otherwise paired = True);
    2. then, independently, with probability null_prob, set the null condition (for classifier-free
       guidance); this leaves the paired flag as it is.

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
        self.num_train_timesteps, self.schedule, self.lam, self.null_prob = (
            num_train_timesteps,
            schedule,
            lam,
            null_prob,
        )
        self.labels: Tensor | None = None
        if isinstance(pool, int):
            self.labels = torch.arange(pool)
        elif isinstance(pool, Tensor):
            self.labels = pool.long().flatten().cpu()
        else:
            self.pool = pool if isinstance(pool, TextPool) else TextPool(list(pool))
        if self.labels is not None:
            if self.labels.numel() == 0:
                raise ValueError("label pool is empty")
            if null_condition is None:
                raise ValueError("class labels need null_condition: the id of the null (unconditional) label")
        self.null_condition = "" if null_condition is None else null_condition

    def __call__(
        self, conditions: Sequence[str] | Tensor, timesteps: Tensor, generator: torch.Generator | None = None
    ) -> tuple[list[str] | Tensor, Tensor]:
        """Return (selected conditions, paired) with paired a BoolTensor (B,) on timesteps' device."""
        B = len(conditions)
        if B != len(timesteps):
            raise ValueError(f"{B} conditions but {len(timesteps)} timesteps")
        replace = random_condition_mask(timesteps, self.num_train_timesteps, self.schedule, self.lam, generator)
        replace = replace.cpu()
        device = generator.device if generator is not None else "cpu"
        n_pool = len(self.labels) if self.labels is not None else len(self.pool)
        draw = torch.randint(n_pool, (B,), generator=generator, device=device).cpu()  # a pool index per sample
        null = _rand(B, generator) < self.null_prob

        if self.labels is not None:  # (B,) label ids, vectorised
            selected = torch.where(replace, self.labels[draw], conditions.cpu())
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


def _first_tensor(output) -> Tensor:
    # diffusers down blocks return (hidden_states, residuals); mid and up blocks a tensor.
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"hooked module returned {type(output).__name__}; expected a tensor or a tuple starting with one")


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the model in .module, torch.compile in ._orig_mod.
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class FeatureDistiller(nn.Module):
    """Feature distillation through forward hooks.

    L_feat = sum over hooked layers l of mean((P_l(student_l) - teacher_l)^2), float32, teacher detached,
    where P_l is a 1x1 convolution (student channels -> teacher channels) where they differ, else identity.

    layers: module names present in both models, or a dict student name -> teacher name.
    Hooks are live only inside `with distiller:` and are removed on exit. The projections are this
    module's own parameters: put the distiller inside the module you wrap in DDP (next to the student)
    so one forward sees every trainable parameter, and leave it out when you export the student.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[str] | Mapping[str, str]):
        super().__init__()
        pairs = dict(layers) if isinstance(layers, Mapping) else {name: name for name in layers}
        if not pairs:
            raise ValueError("FeatureDistiller needs at least one layer")
        # Kept in a plain tuple so they are not registered as submodules: parameters() are the projections.
        self._models = (_unwrap(teacher), _unwrap(student))
        self.pairs = pairs
        for name, model, role in [(n, self._models[1], "student") for n in pairs] + [
            (n, self._models[0], "teacher") for n in pairs.values()
        ]:
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the {role} has no module named {name!r}") from None
        self.proj = nn.ModuleDict()  # key: student name with '.' -> '__' (ModuleDict keys cannot hold dots)
        self._student_feats: dict[str, Tensor] = {}
        self._teacher_feats: dict[str, Tensor] = {}
        self._handles: list = []

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def __enter__(self) -> FeatureDistiller:
        if self._handles:
            return self
        teacher, student = self._models
        for s_name, t_name in self.pairs.items():
            self._handles.append(
                student.get_submodule(s_name).register_forward_hook(self._store(self._student_feats, s_name))
            )
            self._handles.append(
                teacher.get_submodule(t_name).register_forward_hook(
                    self._store(self._teacher_feats, s_name, detach=True)
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    @staticmethod
    def _store(feats: dict, name: str, detach: bool = False):
        def hook(module, args, output):
            feat = _first_tensor(output)
            feats[name] = feat.detach() if detach else feat

        return hook

    def clear(self) -> None:
        self._student_feats.clear()
        self._teacher_feats.clear()

    def features(self) -> tuple[list[Tensor], list[Tensor]]:
        """The stored (student, teacher) activations of every layer, unprojected, e.g. for
        relational_kd_loss. Call before loss(), which clears them."""
        missing = [n for n in self.pairs if n not in self._student_feats or n not in self._teacher_feats]
        if missing:
            raise RuntimeError(
                f"no activation stored for layer {missing[0]!r}: run the teacher and the "
                "student inside `with distiller:` first"
            )
        return [self._student_feats[n] for n in self.pairs], [self._teacher_feats[n] for n in self.pairs]

    @torch.no_grad()
    def probe(self, *inputs, **kwargs) -> None:
        """Run teacher and student once on the same inputs; create a projection for every layer whose
        channel counts differ. Call before building the optimizer and DDP. Idempotent."""
        teacher, student = self._models
        was_active = bool(self._handles)
        self.__enter__()
        try:
            teacher(*inputs, **kwargs)
            student(*inputs, **kwargs)
            for name in self.pairs:
                s, t = self._student_feats[name], self._teacher_feats[name]  # (B, C, H, W) each
                if s.shape[2:] != t.shape[2:]:
                    raise ValueError(
                        f"layer {name!r}: student feature {tuple(s.shape)} and teacher feature "
                        f"{tuple(t.shape)} differ in spatial size"
                    )
                key = self._key(name)
                if s.shape[1] != t.shape[1] and key not in self.proj:
                    self.proj[key] = nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1).to(s.device)
        finally:
            self.clear()
            if not was_active:
                self.__exit__()

    def loss(self) -> Tensor:
        """Sum over layers of the float32 MSE between (projected) student and detached teacher features.
        Clears the stored activations, so nothing is kept between steps."""
        total = None
        try:
            for name, s, t in zip(self.pairs, *self.features()):
                key = self._key(name)
                if key in self.proj:
                    s = self.proj[key](s.to(self.proj[key].weight.dtype))
                elif s.shape != t.shape:
                    raise RuntimeError(
                        f"layer {name!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                        "call distiller.probe(...) once to create the projections"
                    )
                term = F.mse_loss(s.float(), t.float())
                total = term if total is None else total + term
        finally:
            self.clear()
        return total


def _pool_tokens(x: Tensor, max_tokens: int) -> Tensor:
    """(B, C, H, W) or (B, N, C) -> (B, N', C) with N' <= max_tokens, by average pooling."""
    if x.dim() == 4:
        B, C, H, W = x.shape
        f = math.ceil(math.sqrt(H * W / max_tokens)) if H * W > max_tokens else 1
        if f > 1:
            x = F.adaptive_avg_pool2d(x, (max(1, H // f), max(1, W // f)))
        return x.flatten(2).transpose(1, 2)  # (B, N', C)
    if x.dim() == 3:
        if x.shape[1] > max_tokens:
            x = F.adaptive_avg_pool1d(x.transpose(1, 2), max_tokens).transpose(1, 2)
        return x
    raise ValueError(f"relational_kd_loss takes (B, C, H, W) or (B, N, C) features, got shape {tuple(x.shape)}")


def relational_kd_loss(
    student_feats: Tensor | Sequence[Tensor],
    teacher_feats: Tensor | Sequence[Tensor],
    tau: float = 1.0,
    max_tokens: int = 256,
) -> Tensor:
    """Cross-sample relational loss of Relational Diffusion Distillation (arXiv 2410.07679).

    For each position n, the cosine similarity S[n, b, d] between samples b and d of the batch (features
    L2-normalised per position), a row-wise softmax at temperature tau, then KL(teacher || student):
        L = sum_{n,b,d} p_t[n,b,d] (log p_t[n,b,d] - log p_s[n,b,d]) / (B * B * N)
    Features are average-pooled to at most max_tokens positions first, so memory is O(max_tokens * B^2)
    whatever the feature-map size. Student and teacher channel counts may differ (only the B x B
    similarities are compared). Lists of features (one per layer) are summed. Returns float32.
    """
    if isinstance(student_feats, Tensor):
        student_feats, teacher_feats = [student_feats], [teacher_feats]
    total = None
    for s, t in zip(student_feats, teacher_feats, strict=True):
        s = F.normalize(_pool_tokens(s.float(), max_tokens), dim=-1).transpose(0, 1)  # (N, B, Cs)
        t = F.normalize(_pool_tokens(t.detach().float(), max_tokens), dim=-1).transpose(0, 1)  # (N, B, Ct)
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"student {tuple(s.shape[:2])} and teacher {tuple(t.shape[:2])} differ in batch or positions"
            )
        N, B = s.shape[:2]
        log_ps = F.log_softmax(torch.bmm(s, s.transpose(1, 2)) / tau, dim=-1)  # (N, B, B) cosine similarities
        log_pt = F.log_softmax(torch.bmm(t, t.transpose(1, 2)) / tau, dim=-1)
        term = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True) / (B * B * N)
        total = term if total is None else total + term
    return total
