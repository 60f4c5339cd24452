"""Environments that hold only torch, pillow and one release of transformers, as a user's clean environment does.

`transformers_env("5.19.0")` returns the python of a venv under `.transformers-envs/` (gitignored, kept between runs:
a rerun costs nothing) whose site-packages holds `transformers==5.19.0` installed from the registry (`pip install
--no-deps --target`), plus links to this environment's torch, pillow and every other distribution that transformers,
torch and pillow require (checked against their version specifiers), and nothing else: no `trainers`, no
`modeling_gap`, no TRL or PEFT. One torch is shared by all the environments; a release of transformers costs one
wheel. Releases whose requirements this environment does not meet name them in `pins` (e.g. an older
`huggingface_hub`), which are installed the same way.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
ENVS = ROOT / ".transformers-envs"
BASE_DISTRIBUTIONS = ("torch", "pillow", "transformers")


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


def _complete(site: Path, requested: list[str]):
    """Link, from this environment, every distribution that `requested` need and `site` does not hold yet."""
    local = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(site)])}
    pending, seen = [(Requirement(r), "the environment") for r in requested], set()
    while pending:
        requirement, needed_by = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        dist = local.get(name)
        if dist is None:
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                raise RuntimeError(
                    f"{needed_by} needs {requirement}, which this environment lacks: pass a pin in `pins`."
                ) from None
            if not requirement.specifier.contains(dist.version, prereleases=True):
                raise RuntimeError(
                    f"{needed_by} needs {requirement}; this environment has {name} {dist.version}: pass a pin in `pins`."
                )
            _link_distribution(dist, site)
        for line in dist.requires or ():
            needed = Requirement(line)
            if needed.marker is None or needed.marker.evaluate({"extra": ""}):
                pending.append((needed, f"{dist.metadata['Name']} {dist.version}"))


def transformers_env(version: str, pins: tuple[str, ...] = ()) -> str:
    """The python of an environment holding only torch, pillow and `transformers==version` (+ `pins`); built once."""
    env = ENVS / f"transformers-{version}"
    python = env / "bin" / "python"
    if (env / "complete").exists():
        return str(python)
    shutil.rmtree(env, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = _site_packages(env)
    wanted = [f"transformers=={version}", *pins]
    if importlib.metadata.version("transformers") == version:
        wanted = list(pins)  # this environment's own transformers: linked, not installed again
    if wanted:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-compile",
             "--target", str(site), *wanted],
            check=True, capture_output=True, text=True,
        )
    _complete(site, [*BASE_DISTRIBUTIONS, *(Requirement(p).name for p in pins)])
    (env / "complete").write_text(f"transformers=={version} {' '.join(pins)}\n")
    return str(python)


def run_in_env(python: str, script: str, *args, cwd, timeout=300) -> subprocess.CompletedProcess:
    """Run `script` with `python` in a clean process environment (no PYTHONPATH, a private HF_HOME under `cwd`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON", "TRANSFORMERS"))}
    env.update(HF_HOME=str(Path(cwd) / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)
