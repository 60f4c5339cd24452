"""The README is executable: every python and shell block runs, in order, in a fresh directory, with the names of its
"Offline: tiny stand-ins" table replaced by the tiny local checkpoints its first block writes; the blocks that need
GPUs, a 7B model or the network are skipped by name, with their reason, never silently. Breaking a block fails it."""

import os
import shutil
import subprocess
import sys

import pytest

from testing_utils import ROOT, readme_blocks, readme_stand_ins

README = os.path.join(ROOT, "README.md")
TESTS = os.path.dirname(os.path.abspath(__file__))


def run_readme_in(directory, readme=README, timeout=1500):
    """`testing_utils.run_readme` in a fresh process in `directory` (holding the checkout's `recipes/`, as a clone)."""
    shutil.copytree(os.path.join(ROOT, "recipes"), directory / "recipes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(directory / ".hf_home"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PATH=f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}",
               MPLBACKEND="Agg")
    code = f"import sys; sys.path.insert(0, {TESTS!r}); from testing_utils import run_readme; run_readme({str(readme)!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=directory, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_readme_names_its_stand_ins_and_every_skip_has_a_reason():
    text = open(README, encoding="utf-8").read()
    stand_ins = readme_stand_ins(text)
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in stand_ins and "ORG/gap-7b" in stand_ins
    blocks = readme_blocks(text)
    assert blocks[0]["skip"] and not blocks[1]["skip"] and "gap make-tiny" in blocks[1]["code"]  # stand-ins first
    for block in blocks:
        assert block["skip"] is None or len(block["skip"]) > 10, block["name"]
    assert sum(block["skip"] is None for block in blocks) >= 8


@pytest.mark.slow
def test_every_readme_block_runs_as_pasted(tmp_path):
    done = run_readme_in(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    assert done.stdout.rstrip().endswith("README OK")
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED ")]
    blocks = readme_blocks(open(README, encoding="utf-8").read())
    assert len(skipped) == sum(bool(b["skip"]) for b in blocks)  # each skip said, by name
    assert (tmp_path / "outputs" / "gap-qwen2.5-vl-tiny-pca" / "model.safetensors").exists()
    assert (tmp_path / "outputs" / "lens" / "lens_0.png").exists()


def test_a_broken_block_fails_the_readme_naming_it(tmp_path):
    text = open(README, encoding="utf-8").read()
    broken = text.replace("gap make-data --output_dir outputs/tiny-data", "gap make-dat --output_dir outputs/tiny-data")
    assert broken != text
    (tmp_path / "README.md").write_text(broken, encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    done = run_readme_in(work, readme=tmp_path / "README.md", timeout=600)
    assert done.returncode != 0
    assert "FAILED Offline: tiny stand-ins #1" in done.stdout and "unknown stage 'make-dat'" in done.stderr
