"""Helpers shared by the tests: images, chat prompts, forcing a latent span, running the `gap` command and pushing
to the local Hub. Fixtures live in `conftest.py`; no test module imports another."""

import os
import re
import subprocess
import sys

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAP = os.path.join(os.path.dirname(sys.executable), "gap")  # the console script of the installed package

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
QUESTIONS = ["Q?", "What colour is the big square?", "Where is the light corner, left or right?", "Why?"]

HUB_TOKEN = "hf_gapLocalTestToken7f3a9c1e5b"
TINY_VARIANT = os.path.join(ROOT, "hub_configs", "gap-qwen2.5-vl-tiny-pca.yaml")
OUTPUTS = []  # stdout + stderr of every process run against the local Hub, scanned for the token


def save_training_split(path, n=6):
    """A `save_to_disk` split of n rows in GAP's schema (string contents, one marker and aux image per row)."""
    import datasets

    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "aux_images": datasets.List(datasets.Image()),
        "answer": datasets.Value("string"),
    })
    rows = dict(
        images=[[solid_image(COLORS[i % 6])] for i in range(n)],
        messages=[[{"role": "user", "content": f"What colour is square {i}?"},
                   {"role": "assistant", "content": f"Let me look. <|latent|> It is colour {i}. Answer: {i}"}]
                  for i in range(n)],
        aux_images=[[solid_image(COLORS[(i + 2) % 6], size=84)] for i in range(n)],
        answer=[str(i) for i in range(n)],
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return str(path)


def solid_image(color, size=56):
    """A size x size RGB image: one colour with a lighter square in a corner, so images differ in layout."""
    image = Image.new("RGB", (size, size), color)
    corner = tuple(min(c + 90, 255) for c in color)
    for x in range(size // 4):
        for y in range(size // 4):
            image.putpixel((x, y), corner)
    return image


def chat(processor, question, answer=None):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    if answer is None:
        return processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    return processor.apply_chat_template([user, {"role": "assistant", "content": answer}], tokenize=False)


class ForceTokenAtStep(LogitsProcessor):
    """Forces `token` at generation step(s) `steps[row]` (an int or a set; counted from the prompt's end) per row."""

    def __init__(self, token, steps, prompt_length):
        self.token, self.steps, self.prompt_length = token, steps, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        for row, at in self.steps.items():
            if step == at or (isinstance(at, (set, tuple, list)) and step in at):
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, self.token] = 0
        return scores


def question_batch(processor, rows=range(4)):
    """A left-padded batch of the `QUESTIONS` with one solid image each (four different prompt lengths)."""
    processor.tokenizer.padding_side = "left"
    return processor(
        images=[solid_image(COLORS[i]) for i in rows], text=[chat(processor, QUESTIONS[i]) for i in rows],
        padding=True, return_tensors="pt",
    )


def force_span(model, batch, steps):
    """Logits processors that open a latent span at `steps[row]` (generation steps) in each row."""
    return LogitsProcessorList([ForceTokenAtStep(model.config.latent_start_token_id, steps, batch["input_ids"].shape[1])])


def run_gap(*args, env=None, cwd=ROOT, timeout=600):
    """Run the installed `gap` command in a fresh process; returns the completed process (text output)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([GAP, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def hub_env(hub, hf_home):
    """The environment of a process that talks to the local Hub `hub` with a fresh `HF_HOME`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=HUB_TOKEN, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_python(hub, hf_home, args, cwd=ROOT, token_in_env=True):
    """`python ARGS` against the local Hub; its output is kept in `OUTPUTS`."""
    env = hub_env(hub, hf_home)
    if not token_in_env:
        env.pop("HF_TOKEN")
    result = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    OUTPUTS.append(result.stdout + result.stderr)
    return result


def push(hub, tmp_path, *args, token_in_env=True):
    """`gap push ARGS` against the local Hub."""
    env = hub_env(hub, tmp_path / "hf_home_push")
    if not token_in_env:
        env.pop("HF_TOKEN")
    result = run_gap("push", *args, env=env, timeout=300)
    OUTPUTS.append(result.stdout + result.stderr)
    return result


# ---- the README as a script ------------------------------------------------------------------------------------------
README_BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<skip>skip[^>]*?) -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S)
STAND_IN_ROW = re.compile(r"^\| `([^`]+)` \| `([^`]+)` \|", re.M)


def readme_blocks(text: str) -> list[dict]:
    """The README's python and bash blocks in order: name (section and number), language, code, and the reason it is
    skipped (`<!-- readme-test: skip: why -->` on the line before the block) or None."""
    blocks, counts = [], {}
    for match in README_BLOCK.finditer(text):
        headings = re.findall(r"^## (.+)$", text[: match.start()], re.M)
        section = headings[-1] if headings else "top"
        counts[section] = counts.get(section, 0) + 1
        skip = match.group("skip")
        blocks.append(dict(name=f"{section} #{counts[section]}", lang=match.group("lang"), code=match.group("code"),
                           skip=skip.split(":", 1)[1].strip() if skip and ":" in skip else skip))
    return blocks


def readme_stand_ins(text: str) -> dict[str, str]:
    """The README's table of offline stand-ins: the name in the examples -> the local path that replaces it."""
    section = text.split("## Offline: tiny stand-ins", 1)[1].split("\n## ", 1)[0]
    return dict(STAND_IN_ROW.findall(section))


def run_readme(readme: str, log=print) -> None:
    """Run every block of `readme` that is not skipped, in order, in the current directory: python blocks in one
    namespace (this process), bash blocks with `bash -e`; exits 1 naming the first block that fails."""
    import traceback

    text = open(readme, encoding="utf-8").read()
    stand_ins = readme_stand_ins(text)
    namespace = {"__name__": "__readme__"}
    for block in readme_blocks(text):
        if block["skip"]:
            log(f"SKIPPED {block['name']}: {block['skip']}")
            continue
        code = block["code"]
        for name, local in stand_ins.items():
            code = code.replace(name, local)
        log(f"RUNNING {block['name']} ({block['lang']})")
        try:
            if block["lang"] == "python":
                exec(compile(code, f"README {block['name']}", "exec"), namespace)
            else:
                subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], check=True)
        except BaseException:  # noqa: BLE001 - any failure of a block fails the README
            traceback.print_exc()
            log(f"FAILED {block['name']}")
            raise SystemExit(1)
    log("README OK")
