"""FID and IS end to end with the real torch-fidelity Inception-v3 (random weights written with its state-dict keys,
passed as --inception-weights), in subprocesses where a minimal stand-in torchvision satisfies torch-fidelity's
package import (the network itself does not use torchvision). Values are checked against the float64 formulas on
the features that same network extracts from the same pixels."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate import GEN, PROMPTS, random_images, sample_space_fid, torch_fidelity_is

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity not installed"),
]

STUB_TORCHVISION = {  # what `import torch_fidelity` touches at import time
    "torchvision/__init__.py": "",
    "torchvision/datasets.py": "class CIFAR10: pass\nclass STL10: pass\nclass CIFAR100: pass\n",
    "torchvision/transforms/__init__.py": "",
    "torchvision/transforms/functional.py": "",
}

DRIVER = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
mode, weights = sys.argv[1], sys.argv[2]
if mode == "weights":  # torch-fidelity's network, randomly initialised (He init keeps activations O(1))
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    torch.save({}, weights)
    torch.manual_seed(0)
    net = Random("inception-v3-compat", ["2048"], weights)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    torch.save(net.state_dict(), weights)
else:  # features of uint8 images (N, H, W, 3), in batches of 8 as evaluate.py runs them
    import evaluate
    from torch_fidelity.metric_isc import isc_features_to_metric

    net, out, splits = evaluate.load_inception(weights), {}, int(sys.argv[5])
    with np.load(sys.argv[3]) as f, torch.no_grad():
        for key in f.files:
            x = torch.from_numpy(f[key]).permute(0, 3, 1, 2)
            pool, logits = zip(*(net(x[i : i + 8]) for i in range(0, len(x), 8)))
            out[key + "_pool"], out[key + "_logits"] = torch.cat(pool).double().numpy(), torch.cat(logits).numpy()
    np.savez(sys.argv[4], **out)
    print(json.dumps(isc_features_to_metric(torch.from_numpy(out["gen_logits"]), splits)))
"""


def real_pixels(folder: Path, size: int, tmp: Path) -> np.ndarray:
    """The reference pipeline written out with files: open, resize, save JPEG, open."""
    arrays = []
    for path in sorted(folder.iterdir()):
        Image.open(path).resize((size, size)).save(tmp / "real.jpg")
        arrays.append(np.asarray(Image.open(tmp / "real.jpg").convert("RGB")))
    return np.stack(arrays)


def test_fid_and_is_with_torch_fidelitys_inception(tiny_sd, tmp_path):
    for name, text in STUB_TORCHVISION.items():
        (tmp_path / "stub" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stub" / name).write_text(text)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "stub"), str(ROOT), env.get("PYTHONPATH", "")])

    def python(*args, ok=True, stub=True):
        # the stand-in only where torch-fidelity is imported: transformers would take it for a real torchvision
        cmd, run_env = [sys.executable, *map(str, args)], env if stub else {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=600)
        assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
        return proc

    weights = tmp_path / "inception.pth"
    python(tmp_path / "driver.py", "weights", weights)
    real, real_cats = random_images(tmp_path / "real", 14, (40, 30)), random_images(tmp_path / "cats", 10, seed=3)
    (tmp_path / "prompts.csv").write_text("file_name,text\n" + "".join(f"{i}.jpg,{p}\n" for i, p in enumerate(PROMPTS)))
    (tmp_path / "cat_ids.txt").write_text("0\n1\n5\n")
    evaluate = [ROOT / "evaluate.py", "--inception-weights", weights]
    proc = python(*evaluate, "--ref", real, "--save-ref-stats", tmp_path / "ref.npz", "--resize", "32")
    assert "warning: reference" in proc.stdout  # 14 images for 2048 features: said, not hidden
    out = tmp_path / "eval"
    subset = f"cats={tmp_path / 'cat_ids.txt'}:{real_cats}"
    args = ["--model", tiny_sd, "--prompts", tmp_path / "prompts.csv", "--out-dir", out, "--ref", tmp_path / "ref.npz"]
    python(ROOT / "evaluate.py", *args, *GEN, "--metrics", "none", stub=False)  # generate
    python(*evaluate, *args[2:], *GEN, "--subset", subset, "--metrics", "fid,is", "--is-splits", "3")  # score
    m = json.loads((out / "metrics.json").read_text())["metrics"]

    # the same network on the same pixels, in another process
    gen = np.stack([np.asarray(Image.open(out / "images" / f"{i:06d}.jpg")) for i in range(6)])
    np.savez(
        tmp_path / "pixels.npz",
        gen=gen,
        real=real_pixels(real, 32, tmp_path),
        cats=real_pixels(real_cats, 32, tmp_path),
    )
    proc = python(tmp_path / "driver.py", "features", weights, tmp_path / "pixels.npz", tmp_path / "f.npz", 3)
    their_is = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(tmp_path / "f.npz") as f:
        feats = dict(f)
    assert feats["gen_pool"].shape == (6, 2048) and feats["gen_logits"].shape == (6, 1008)
    assert feats["gen_pool"].std() > 1e-3  # the random network does not collapse
    assert m["all"]["fid"] == pytest.approx(sample_space_fid(feats["real_pool"], feats["gen_pool"]), rel=1e-5)
    cats = [0, 1, 5]
    assert m["cats"]["fid"] == pytest.approx(sample_space_fid(feats["cats_pool"], feats["gen_pool"][cats]), rel=1e-5)
    assert m["all"]["fid"] != pytest.approx(m["cats"]["fid"], rel=1e-3)
    expected_is = torch_fidelity_is(feats["gen_logits"], 3)
    assert (m["all"]["is_mean"], m["all"]["is_std"]) == pytest.approx(expected_is, rel=1e-5)
    assert (their_is["inception_score_mean"], their_is["inception_score_std"]) == pytest.approx(expected_is, rel=1e-9)
    assert (m["cats"]["is_mean"], m["cats"]["is_std"]) == pytest.approx(
        torch_fidelity_is(feats["gen_logits"][cats], 3), rel=1e-5
    )

    # weights that are not a plain state dict, or missing: one line, exit 1
    import torch

    torch.save(Path("x"), tmp_path / "pickled.pth")
    for bad, why in ((tmp_path / "pickled.pth", "UnpicklingError"), (tmp_path / "nope.pth", "FileNotFoundError")):
        cmd = [ROOT / "evaluate.py", "--inception-weights", bad, "--ref", real, "--save-ref-stats", tmp_path / "x.npz"]
        lines = python(*cmd, ok=False).stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot load Inception weights {bad} ({why}")
