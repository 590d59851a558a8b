"""Peer virtual environments under ``benchmarks/.work/venvs``: created with pip on first use, reused after.

Each peer lives in its own venv because their pins clash with ours (infinity-emb 0.0.78 wants
``numpy<2`` and ``sentence-transformers<4``; optimum-onnx wants ``transformers<4.58``).
torch is installed first and pinned to the one CPU build allowed here, so no resolver step can
pull a CUDA wheel; the ``[all]`` extra of infinity is avoided because its CUDA torchvision breaks
imports (only ``server,torch,optimum`` are installed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.models import WORK

VENVS = WORK / "venvs"
TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class PeerEnv:
    name: str
    steps: tuple[tuple[str, ...], ...]  # pip install argument lists, in order
    check: str  # python code that must run cleanly in the venv
    versions: tuple[str, ...]  # distributions whose versions the report lists

    @property
    def root(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.root / ".bench-ready.json"


PEERS: dict[str, PeerEnv] = {
    "infinity": PeerEnv(
        "infinity",
        ((TORCH_PIN,), ("infinity-emb[server,torch,optimum]==0.0.78",)),
        "import infinity_emb, optimum.onnxruntime, torch, sentence_transformers",
        ("infinity-emb", "torch", "transformers", "sentence-transformers", "optimum", "optimum-onnx",
         "onnxruntime", "numpy"),
    ),
    "mosec": PeerEnv(
        "mosec",
        (("mosec==0.9.8", "onnxruntime==1.31.1", "tokenizers", "numpy", "msgspec"),),
        "import mosec, onnxruntime, tokenizers, numpy",
        ("mosec", "onnxruntime", "tokenizers", "numpy"),
    ),
}


def _versions(env: PeerEnv) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        f"names = {list(env.versions)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'absent'\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True, check=True)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def ensure_env(name: str, *, log: Path | None = None) -> dict[str, str]:
    """Create (idempotently) the peer's venv; return the installed versions. Raises RuntimeError."""
    env = PEERS[name]
    if env.stamp.exists():
        try:
            return dict(json.loads(env.stamp.read_text()))
        except ValueError:
            pass
    logf = log or (WORK / "logs" / f"venv-{name}.log")
    logf.parent.mkdir(parents=True, exist_ok=True)
    with open(logf, "a") as fh:
        def run(args: list[str]) -> None:
            fh.write(f"$ {' '.join(args)}\n")
            fh.flush()
            r = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"venv {name}: `{' '.join(args)}` failed (log {logf})")

        if not env.python.exists():
            run([sys.executable, "-m", "venv", str(env.root)])
        run([str(env.python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
        for step in env.steps:
            run([str(env.python), "-m", "pip", "install", "-q", *step])
        # A CUDA torchvision (pulled by some extras) breaks transformers' imports: keep it out.
        subprocess.run([str(env.python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"],
                       stdout=fh, stderr=subprocess.STDOUT, check=False)
        run([str(env.python), "-c", env.check])
    versions = _versions(env)
    env.stamp.write_text(json.dumps(versions))
    return versions
