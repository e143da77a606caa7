"""bench/memory.py at full size (a meta-device trace, about 10 s of CPU): weight rows are parameter counts times
bytes exactly, gradient checkpointing keeps less, and every total is the sum of its rows."""

import json
import subprocess
import sys

from test_train import ENV, ROOT

PARAMS = {  # diffusers / transformers models built on the meta device from the real configs
    "koala_1b": 1_161_184_324,
    "koala_700m": 782_822_724,
    "bk_base": 579_384_964,
    "sdxl": 2_567_463_684,
    "sd14": 859_520_964,
    "clip_l": 123_060_480,
    "clip_g": 694_659_840,
    "vae": 83_653_863,
}
ACT = "activations kept for backward"


def test_memory_estimate_adds_up():
    cmd = [sys.executable, str(ROOT / "bench" / "memory.py"), "--json"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=True, timeout=600).stdout
    assert "not measured on a GPU" in out and "CUDA context" in out
    runs = {(r["student"], r["checkpointing"]): r for r in json.loads(out.splitlines()[-1])["runs"]}
    assert sorted(runs) == [(name, ckpt) for name in ("bk_base", "koala_1b", "koala_700m") for ckpt in (False, True)]
    assert runs["koala_1b", False]["bytes"]["student weights, fp32"] == 1_161_184_324 * 4
    for (name, ckpt), run in runs.items():
        b, n, s = run["bytes"], run["params"], PARAMS[name]
        sdxl = name.startswith("koala")
        encoders = ["clip_l", "clip_g", "vae"] if sdxl else ["clip_l", "vae"]
        assert n == {"student": s, "teacher": PARAMS["sdxl" if sdxl else "sd14"]} | {k: PARAMS[k] for k in encoders}
        assert b["student weights, fp32"] == b["gradients, fp32"] == 4 * s and b["AdamW moments, fp32"] == 8 * s
        assert b["EMA of the student, fp32"] == (0 if sdxl else 4 * s)  # KOALA trains without EMA, BK-SDM with
        assert b["teacher UNet, fp16"] == 2 * n["teacher"] and b["VAE, fp32"] == 4 * PARAMS["vae"]
        assert b["text encoders, fp16"] == 2 * (PARAMS["clip_l"] + sdxl * PARAMS["clip_g"])
        assert 0.99 * 2 * s < b["student weights cast to fp16"] <= 2 * s  # all but the norms' weights (fp32 ops)
        assert b["feature KD: features + fp32 differences"] > 0
        assert run["total"] == sum(b.values())
        if ckpt:
            assert b[ACT] < runs[name, False]["bytes"][ACT] / 2
    total = next(line for line in out.splitlines() if line.startswith("total")).split()[1:]
    assert total == [f"{run['total'] / 2**30:.2f}" for run in runs.values()]  # the table shows the JSON's bytes
