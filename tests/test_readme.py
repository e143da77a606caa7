"""The documentation (README.md, docs/*.md, bench/README.md): every command's flags exist, and the CPU walk-through
runs as written."""

import os
import re
import shlex
import subprocess
import sys
from functools import cache

import pytest
from conftest import DOCS, ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
DOC_TEXT = {path: path.read_text(encoding="utf-8") for path in DOCS}
SCRIPTS = (
    "train.py",
    "evaluate.py",
    "toy_mnist.py",
    "docs/figures.py",
    "bench/memory.py",
    "bench/text_pool.py",
    "bench/train_step.py",
    "bench/evaluate_metrics.py",
)
PASS_ON = {"docs/figures.py": "toy_mnist.py"}  # figures.py hands the flags it does not know to the toy's parser


def bash_blocks(text: str) -> list[str]:
    """Fenced bash blocks, with backslash-continued lines joined."""
    blocks = re.findall(r"^\s*```bash\n(.*?)^\s*```", text, flags=re.S | re.M)
    return [re.sub(r"\\\n\s*", " ", b) for b in blocks]


def commands(text: str) -> list[str]:
    """Every line of a bash block (comments cut, $T variables expanded)."""
    found = []
    for block in bash_blocks(text):
        variables = {}
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            m = re.match(r'^(\w+)="(.*)"$', line)
            if m:  # T="torchrun ... train.py --teacher ..." then $T --data ...
                variables[m.group(1)] = m.group(2)
                line = m.group(2)
            line = re.sub(r"^\$(\w+)", lambda v, variables=variables: variables.get(v.group(1), v.group(0)), line)
            found.append(line)
    return found


def script_invocations() -> list[tuple[str, list[str], str]]:
    """(script, flags after the script name, where) for every command in the docs that runs one of ours."""
    found = []
    for path, text in DOC_TEXT.items():
        for line in commands(text):
            try:
                tokens = shlex.split(line)
            except ValueError:
                continue
            for i, tok in enumerate(tokens):
                if tok in SCRIPTS:
                    flags = [t.split("=")[0] for t in tokens[i + 1 :] if t.startswith("--")]
                    found.append((tok, flags, f"{path.relative_to(ROOT)}: {line}"))
                    break
    return found


@cache
def help_text(script: str) -> str:
    out = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_readme_names_its_two_commands_first():
    quick = README.index("## Quick start")
    blocks = bash_blocks(README[quick:])
    assert "pip install -r requirements.txt" in blocks[0] and "python toy_mnist.py" in blocks[0]
    assert blocks[1].strip() == "python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == blocks[1].strip()  # CI runs exactly the README's test command


def test_every_flag_in_the_docs_exists():
    invocations = script_invocations()
    assert {s for s, _, _ in invocations} >= {"train.py", "evaluate.py", "toy_mnist.py"}
    for script, flags, where in invocations:
        text = help_text(script) + (help_text(PASS_ON[script]) if script in PASS_ON else "")
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", text), f"{script} has no {flag} ({where})"


@pytest.mark.slow
def test_cpu_walkthrough_runs_as_written(tmp_path):
    """docs/train.md's 'Try it on the CPU' block, verbatim, in a scratch folder holding the scripts."""
    doc = DOC_TEXT[ROOT / "docs" / "train.md"]
    block = bash_blocks(doc[doc.index("### Try it on the CPU") :])[0]
    for name in ("train.py", "randcond.py", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "runs").mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    for run in ("tiny_student", "tiny_student_ddp"):
        assert (tmp_path / "runs" / run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert (tmp_path / "runs" / run / "model_index.json").is_file()
