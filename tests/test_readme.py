"""The documentation (README.md, docs/*.md, bench/README.md): every command's flags exist, every link resolves
inside the repository, and the CPU walk-through and the library's training step run as written."""

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


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def commands(text: str) -> list[str]:
    """Every line of a bash block (comments cut, $T variables expanded) and every inline `python ...` or
    `torchrun ...` command in the prose."""
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
    spans = re.findall(r"`([^`\n]+)`", prose(text))
    return found + [s for s in spans if re.match(r"(\w+=\S+ )*(python|torchrun) ", s)]


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
    assert {s for s, _, _ in invocations} == set(SCRIPTS)  # each script is shown somewhere
    for script, flags, where in invocations:
        text = help_text(script) + (help_text(PASS_ON[script]) if script in PASS_ON else "")
        for flag in flags:
            assert re.search(rf"{re.escape(flag)}\b", text), f"{script} has no {flag} ({where})"


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_in_the_docs_resolves_inside_the_repository():
    for path, text in DOC_TEXT.items():
        assert "REFERENCE.md" not in text and "shared/data" not in text, path
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
            if target.startswith(("https://", "http://")):
                continue
            file, _, fragment = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.is_relative_to(ROOT) and dest.exists(), f"{path.relative_to(ROOT)}: {target}"
            if fragment:
                headings = re.findall(r"^#+ (.+)$", prose(dest.read_text(encoding="utf-8")), flags=re.M)
                assert fragment in {anchor(h) for h in headings}, f"{path.relative_to(ROOT)}: {target}"


def test_the_library_step_runs_as_written(tiny_sd, tmp_path, monkeypatch):
    """docs/randcond.md's training step, verbatim, on the tiny SD pipeline and a bk_base student of it."""
    import torch
    from diffusers import DiffusionPipeline

    import train

    code = re.findall(r"```python\n(.*?)```", DOC_TEXT[ROOT / "docs" / "randcond.md"], flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "laion_20m.txt").write_text("a photo of a dog\na red car on a bridge\nan old house\n")
    pipe = DiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, feature_extractor=None)
    student, _ = train.build_student(pipe.unet, "bk_base", None)
    teacher_before = [p.detach().clone() for p in pipe.unet.parameters()]
    student_before = [p.detach().clone() for p in student.parameters()]
    names = dict(pipe=pipe, student=student, latents=torch.randn(2, 4, 8, 8), captions=["a cat", "a dog"])
    names["encode"] = lambda captions: pipe.encode_prompt(captions, "cpu", 1, do_classifier_free_guidance=False)[0]
    exec(compile(code, "docs/randcond.md", "exec"), names)
    assert torch.isfinite(names["loss"]) and names["paired"].dtype == torch.bool and len(names["captions"]) == 2
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))  # the student learned
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(teacher_before, pipe.unet.parameters()))


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
