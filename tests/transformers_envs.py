"""Environments that hold only torch, pillow and one release of transformers, as a user's clean environment does.

`transformers_env("5.19.0")` returns the python of a venv under `.transformers-envs/` (gitignored, kept between runs:
a rerun costs nothing) whose site-packages holds `transformers==5.19.0` installed from the registry (`pip install
--no-deps --target`), plus links to this environment's torch, pillow and every other distribution that transformers,
torch and pillow require (checked against their version specifiers), and nothing else: no `trainers`, no
`modeling_gap`, no TRL or PEFT. One torch is shared by all the environments; a release of transformers costs one
wheel, plus the releases of its requirements that this environment lacks or holds outside their specifiers (5.0.0:
an older `huggingface_hub`, `tokenizers` and `httpx`), installed the same way.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
ENVS = ROOT / ".transformers-envs" / Path(sys.prefix).name  # per source environment (.venv, .venv-vllm): links
BASE_DISTRIBUTIONS = ("torch", "pillow", "transformers")
_BUILDING = defaultdict(threading.Lock)  # one builder per environment when tests build them from several threads


def _site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _link_distribution(dist: importlib.metadata.Distribution, site: Path):
    """Link every top-level entry of an installed distribution (its packages, modules and `.dist-info`) into `site`."""
    base = Path(dist.locate_file(""))
    for top in sorted({Path(f).parts[0] for f in dist.files or ()}):
        if top in ("..", "__pycache__") or (site / top).exists():
            continue
        if (base / top).exists():
            (site / top).symlink_to(base / top)


def _link_requirements(site: Path, requested: tuple[str, ...]) -> list[str]:
    """Link, from this environment, every distribution that `requested` need (recursively) and `site` does not hold
    yet; returns the requirements this environment cannot meet (absent, or a release outside the specifier)."""
    local = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(site)])}
    pending, seen, unmet = [Requirement(r) for r in requested], set(), []
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        dist = local.get(name)
        if dist is None:
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                dist = None
            if dist is None or not requirement.specifier.contains(dist.version, prereleases=True):
                unmet.append(f"{requirement.name}{requirement.specifier}")
                continue
            _link_distribution(dist, site)
        for line in dist.requires or ():
            needed = Requirement(line)
            if needed.marker is None or needed.marker.evaluate({"extra": ""}):
                pending.append(needed)
    return unmet


def _install(site: Path, requirements: list[str]):
    """`pip install --no-deps --target site`: the requirements alone (their own requirements are linked or installed
    by the next round)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-compile",
         "--target", str(site), *requirements],
        check=True, capture_output=True, text=True,
    )


def transformers_env(version: str) -> str:
    """The python of an environment holding only torch, pillow and `transformers==version` with its requirements
    (linked from this environment where it has a fitting release, installed otherwise); built once."""
    with _BUILDING[version]:
        return _build(ENVS / f"transformers-{version}", version)


def _build(env: Path, version: str) -> str:
    python = env / "bin" / "python"
    site = _site_packages(env)
    # Reused unless a distribution it links to has since left this environment (upgraded, uninstalled).
    if (env / "complete").exists() and all(entry.exists() for entry in site.iterdir()):
        return str(python)
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    if importlib.metadata.version("transformers") != version:  # else this environment's own is linked
        _install(site, [f"transformers=={version}"])
    for _ in range(4):  # each round installs what the previous round found unmet: an older hub, its httpx, ...
        unmet = _link_requirements(site, BASE_DISTRIBUTIONS)
        if not unmet:
            break
        _install(site, unmet)
    else:
        raise RuntimeError(f"transformers {version}: requirements still unmet after four rounds: {unmet}")
    held = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions(path=[str(site)]))
    (env / "complete").write_text("\n".join(held) + "\n")  # what the environment holds, installed or linked
    return str(python)


def run_in_env(python: str, script: str, *args, cwd, timeout=300) -> subprocess.CompletedProcess:
    """Run `script` with `python` in a clean process environment (no PYTHONPATH, a private HF_HOME under `cwd`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON", "TRANSFORMERS"))}
    env.update(HF_HOME=str(Path(cwd) / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)
