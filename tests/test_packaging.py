"""Packaging: every third-party import is declared in pyproject.toml, in the right place, and
the built wheel installs and runs ``mammut demo`` outside the checkout.

Where an import must be declared:

- the library core is the module-level import closure of ``mammut/__init__.py``; what it
  imports at module level must be a base dependency (``[project] dependencies``: torch, einops);
- every other import (a lazy one inside a function, ``importlib.import_module("x")``, or any
  import of a module outside the core) must be covered by the extra that ``EXTRA_FOR`` assigns to
  its module (the base dependencies always count).

Import names become distributions through the installed metadata
(``importlib.metadata.packages_distributions()``), with ``KNOWN_DISTS`` as the readable fallback
for packages this environment lacks; ``HIDDEN_DEPS`` lists imports that need another
distribution than the one that provides them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYPROJECT = ROOT / "pyproject.toml"
DIST_NAME = "mammut-vl"

# Which extra must cover the optional imports of a module (longest dotted prefix wins). A module
# outside the core, or a lazy import in a core module, with no entry here fails the test.
EXTRA_FOR = {
    "mammut.cli": "train",
    "mammut.train": "train",
    "mammut.data": "train",
    "mammut.eval": "train",
    "mammut.tasks": "train",  # training tasks: data, objectives, evaluation
    "mammut.inference": "train",  # loading run folders, image files, batched embedding
    "mammut.io": "io",  # our checkpoint format (config.json + safetensors)
    "mammut.loading": "train",  # mammut.load: checkpoints, run folders (yaml), Hub snapshots (huggingface_hub)
    "mammut.runs": "train",  # the run-folder reader of mammut.load: config.yaml (yaml), safetensors
    "mammut.tokenizer": "train",  # the BPE tokenizer (moved from mammut.data.tokenizer): tokenizers
    "mammut.clip_tokenizer": "interop",  # open_clip's CLIP BPE (moved from mammut.convert.clip_tokenizer)
    "mammut.preprocess": "train",  # ImagePreprocess: PIL + torchvision, imported per call
    "mammut.apps": "search",  # mammut index / search / serve: faiss, FastAPI, uvicorn
    "mammut.convert": "interop",  # converters of others' weights: open_clip CoCa, its tokenizer
    "mammut.encoders.external": "interop",  # timm / transformers / vit-pytorch adapters
    "mammut.data.video_files": "video",  # PyAV: decoding video files and shards
    "mammut.eval.detection": "detection",  # pycocotools' COCOeval
    "mammut.tasks.detection": "detection",  # scipy's linear_sum_assignment (Hungarian matching)
}

# import name -> distribution, where the two differ or the package may not be installed here;
# test_known_dists_agree_with_the_installed_metadata keeps it honest.
KNOWN_DISTS = {
    "torch": "torch",
    "torchvision": "torchvision",
    "einops": "einops",
    "numpy": "numpy",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "tensorboard": "tensorboard",
    "webdataset": "webdataset",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface-hub",
    "open_clip": "open-clip-torch",
    "timm": "timm",
    "transformers": "transformers",
    "vit_pytorch": "vit-pytorch",
    "av": "av",
    "scipy": "scipy",
    "pycocotools": "pycocotools",
}

# imports that need a distribution besides the one providing the module
HIDDEN_DEPS = {
    "torch.utils.tensorboard": "tensorboard",  # torch's SummaryWriter imports the tensorboard package
}

# calls whose first (string) argument is a module imported at run time;
# _require is mammut.encoders.external's import_module wrapper
DYNAMIC_IMPORTERS = {"import_module", "find_spec", "__import__", "_require"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- source scan


@dataclass(frozen=True)
class Import:
    module: str  # importing module, e.g. "mammut.data.datasets"
    name: str  # imported dotted name, absolute ("mammut.layers" for a relative import)
    lazy: bool  # inside a function or TYPE_CHECKING block, or a dynamic import_module(...)
    line: int

    @property
    def top(self) -> str:
        return self.name.split(".")[0]


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.depth = 0  # function / TYPE_CHECKING nesting
        self.found: list[Import] = []

    def _add(self, name: str, node: ast.AST, lazy: bool | None = None) -> None:
        self.found.append(Import(self.module, name, self.depth > 0 if lazy is None else lazy, node.lineno))

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self.depth += 1
            for child in node.body:
                self.visit(child)
            self.depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            if node.module == "__future__":
                return
            base = node.module or ""
        else:
            base = _resolve_relative(self.module, self.is_package, node.level, node.module)
        self._add(base, node)
        # `from pkg import sub` may import the submodule pkg.sub (kept when it is a module of ours)
        for alias in node.names:
            if alias.name != "*":
                self._add(f"{base}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if fname in DYNAMIC_IMPORTERS and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                self._add(arg.value, node, lazy=True)
        self.generic_visit(node)


def scan(src: Path, package: str = "mammut") -> dict[str, list[Import]]:
    """Every module of ``package`` under ``src`` -> the imports it makes."""
    out: dict[str, list[Import]] = {}
    for path in sorted((src / package).rglob("*.py")):
        name = module_name(path, src)
        collector = _Collector(name, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        out[name] = collector.found
    return out


def core_modules(imports: dict[str, list[Import]], root: str = "mammut") -> set[str]:
    """The modules that ``import <root>`` executes: its module-level import closure (a module
    brings in its parent packages)."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        mod = todo.pop()
        if mod in seen or mod not in imports:
            continue
        seen.add(mod)
        for imp in imports[mod]:
            if imp.lazy or imp.top != root:
                continue
            parts = imp.name.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return seen


# --------------------------------------------------------------------------- declarations


def declared(pyproject: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(base dependencies, extra -> everything it installs beyond the base), normalized names;
    self-references such as ``mammut-vl[io]`` are expanded."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    own = normalize(project["name"])
    base = {normalize(Requirement(r).name) for r in project.get("dependencies", [])}
    raw = {extra: [Requirement(r) for r in reqs] for extra, reqs in project.get("optional-dependencies", {}).items()}

    def expand(extra: str, stack: tuple[str, ...] = ()) -> set[str]:
        if extra in stack:
            return set()
        names: set[str] = set()
        for req in raw[extra]:
            if normalize(req.name) == own:
                for sub in req.extras:
                    names |= expand(sub, stack + (extra,))
            else:
                names.add(normalize(req.name))
        return names

    return base, {extra: expand(extra) for extra in raw}


def distributions_of(imp: Import, installed: dict[str, list[str]]) -> set[str]:
    """Distributions (normalized) that the import needs; an empty set means unknown."""
    dists = {normalize(d) for d in installed.get(imp.top, [])}
    if not dists and imp.top in KNOWN_DISTS:
        dists = {normalize(KNOWN_DISTS[imp.top])}
    return dists


def hidden_deps_of(imp: Import) -> set[str]:
    return {normalize(d) for prefix, d in HIDDEN_DEPS.items() if imp.name == prefix or imp.name.startswith(prefix + ".")}


def extra_for(module: str) -> str | None:
    best = None
    for prefix in EXTRA_FOR:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return EXTRA_FOR[best] if best else None


def third_party(imp: Import, first_party: str = "mammut") -> bool:
    return bool(imp.top) and imp.top != first_party and imp.top not in sys.stdlib_module_names


def find_problems(src: Path, pyproject: Path, installed: dict[str, list[str]] | None = None) -> list[str]:
    """Every third-party import under ``src/mammut`` that pyproject does not declare where it must."""
    installed = importlib.metadata.packages_distributions() if installed is None else installed
    imports = scan(src)
    core = core_modules(imports)
    base, extras = declared(pyproject)
    problems: list[str] = []
    seen: set[tuple[str, int, str]] = set()

    def report(imp: Import, key: str, message: str) -> None:
        # `from torch.utils import data, tensorboard` is several Import records: one problem each
        if (imp.module, imp.line, key) not in seen:
            seen.add((imp.module, imp.line, key))
            problems.append(f"{imp.module} line {imp.line}: import {imp.name}: {message}")

    for module, found in imports.items():
        for imp in found:
            if not third_party(imp):
                continue
            dists = distributions_of(imp, installed)
            if not dists:
                report(imp, "?", "unknown distribution (install it, declare it, add it to KNOWN_DISTS)")
                continue
            needs = [dists] + [{d} for d in hidden_deps_of(imp)]  # any one of a set satisfies it
            if module in core and not imp.lazy:
                for choice in needs:
                    if not choice & base:
                        report(imp, str(sorted(choice)), f"the core (`import mammut`) imports it, so "
                                                         f"{sorted(choice)} must be in [project] dependencies")
                continue
            extra = extra_for(module)
            if extra is None:
                report(imp, "no-extra", f"optional import in a module with no extra: add {module} to EXTRA_FOR")
                continue
            if extra not in extras:
                report(imp, "bad-extra", f"EXTRA_FOR names the extra {extra!r}, which pyproject lacks")
                continue
            for choice in needs:
                if not choice & (base | extras[extra]):
                    report(imp, str(sorted(choice)), f"{sorted(choice)} must be in the {extra!r} extra")
    return problems


# --------------------------------------------------------------------------- fast tests


def test_every_third_party_import_is_declared():
    problems = find_problems(SRC, PYPROJECT)
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_the_core_is_the_import_closure_of_mammut():
    imports = scan(SRC)
    core = core_modules(imports)
    # sanity of the scan: what `import mammut` runs, and what it must not
    assert {"mammut", "mammut.layers.attention", "mammut.models.mammut", "mammut.generation",
            "mammut.losses", "mammut.io.checkpoint", "mammut.encoders.external", "mammut.transforms.m2pt"} <= core
    assert not core & {"mammut.cli", "mammut.train.loop", "mammut.data.datasets", "mammut.eval.report",
                       "mammut.convert", "mammut.convert.open_clip"}
    third = sorted({i.top for m in core for i in imports[m] if not i.lazy and third_party(i)})
    assert set(third) <= {"torch", "einops"}, third
    # the dynamic imports of the external-encoder adapters are seen
    lazy = {i.name for i in imports["mammut.encoders.external"] if i.lazy}
    assert {"timm", "transformers", "vit_pytorch.extractor"} <= lazy


def test_known_dists_agree_with_the_installed_metadata():
    installed = importlib.metadata.packages_distributions()
    wrong = {name: (dist, installed[name]) for name, dist in KNOWN_DISTS.items()
             if name in installed and normalize(dist) not in {normalize(d) for d in installed[name]}}
    assert not wrong


def test_torchvision_is_in_the_train_extra():
    base, extras = declared(PYPROJECT)
    assert base == {"torch", "einops"}
    assert {"torchvision", "pillow", "pyyaml", "safetensors", "tokenizers", "webdataset"} <= extras["train"]
    assert "torchvision" not in base  # the library core does not need it


@pytest.mark.parametrize("where, code, expect", [
    ("data/extra.py", "import sklearn\n", r"mammut\.data\.extra line 1: import sklearn: \['scikit-learn'\] must be in the 'train' extra"),
    ("layers/extra.py", "import numpy as np\n", r"mammut\.layers\.extra line 1: import numpy: the core .* \['numpy'\] must be in \[project\] dependencies"),
    ("layers/extra.py", "def f():\n    import yaml\n", r"mammut\.layers\.extra line 2: import yaml: optional import in a module with no extra"),
    ("train/extra.py", "def f():\n    from PIL import Image\n", None),  # pillow is in train: fine
    ("encoders/external.py", "def f():\n    _require('open_clip', 'x')\n", None),  # interop: fine
    ("eval/extra.py", "import importlib\nimportlib.import_module('timm')\n", r"import timm: \['timm'\] must be in the 'train' extra"),
    ("train/extra.py", "from torch.utils.tensorboard import SummaryWriter\n", None),
    ("cli.py", "import somethingnew\n", r"import somethingnew: unknown distribution"),
], ids=["undeclared-in-train", "core-needs-base", "lazy-without-extra", "declared-lazy", "declared-dynamic",
        "dynamic-undeclared", "hidden-dep", "unknown"])
def test_the_check_catches_undeclared_imports(tmp_path, where, code, expect):
    """The checker on a copy of the package with one module added (or replaced)."""
    src = tmp_path / "src"
    shutil.copytree(SRC / "mammut", src / "mammut", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    if where.startswith("layers/"):  # make the new module part of the core
        init = src / "mammut" / "layers" / "__init__.py"
        init.write_text(init.read_text() + "\nfrom . import extra\n")
    (src / "mammut" / where).write_text(code)
    installed = dict(importlib.metadata.packages_distributions(), sklearn=["scikit-learn"])
    installed.pop("somethingnew", None)
    problems = find_problems(src, PYPROJECT, installed)
    if expect is None:
        assert not problems
    else:
        assert len(problems) == 1 and re.search(expect, problems[0]), problems

    # and a pyproject without tensorboard in train: the hidden dependency of torch.utils.tensorboard
    if where == "train/extra.py" and "tensorboard" in code:
        pyproject = tmp_path / "pyproject.toml"
        pyproject.write_text(re.sub(r'\n\s*"tensorboard[^"]*",', "", PYPROJECT.read_text()))
        problems = find_problems(src, pyproject, installed)
        assert any("import torch.utils.tensorboard: ['tensorboard'] must be in the 'train' extra" in p
                   for p in problems), problems


# --------------------------------------------------------------------------- the wheel, installed


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for the install and the CLI: no PYTHONPATH, no pip configuration (no index,
    no find-links: only what is already installed can satisfy a requirement)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON")) and k not in ("VIRTUAL_ENV", "MAMMUT_DEBUG")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", **extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _deps_only_site(tmp: Path) -> Path:
    """A folder of links to everything in this environment's site-packages except the
    ``mammut-vl`` distribution (the dev venv's editable install: its .pth, finder, dist-info)."""
    site = Path(sysconfig.get_paths()["purelib"])
    skip = {"mammut", "__pycache__"}
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if normalize(dist.metadata["Name"]) == normalize(DIST_NAME):
            skip |= {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}  # .pth, finder
    farm = tmp / "deps-site"
    farm.mkdir()
    for entry in site.iterdir():
        own_metadata = entry.suffix in (".dist-info", ".egg-info") and \
            normalize(entry.name.split("-")[0]) == normalize(DIST_NAME.replace("-", "_"))
        if entry.name not in skip and not own_metadata and entry.suffix != ".pth":
            (farm / entry.name).symlink_to(entry)
    return farm


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_installs_and_runs_the_demo_outside_the_checkout(tmp_path):
    """Proves: the wheel builds offline, holds the package files and licences, its declared
    requirements (with [train]) resolve against the installed versions without an index, and the
    installed copy (not src/) runs ``mammut demo`` from an empty folder. Does not prove that the
    extras are complete (the dev venv's packages are all visible; the import scan above does that)
    nor that the lower bounds work (only the dev venv's versions are tried)."""
    assert Path(sys.prefix) != Path(sys.base_prefix), "run from the dev venv (make setup)"
    setuptools_version = importlib.metadata.version("setuptools")
    assert int(setuptools_version.split(".")[0]) >= 77, f"setuptools {setuptools_version}: the dev extra needs >=77"
    env = _clean_env()

    # 1. build the wheel offline from a copy of what a source distribution holds (the shared
    #    checkout gets no build/ or egg-info, and stale build/lib files cannot leak in)
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(SRC, tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, tree],
         tmp_path, env)
    (wheel,) = dist.glob("mammut_vl-*-py3-none-any.whl")
    version = wheel.name.split("-")[1]

    # 2. what the wheel holds: every file of the package (modules, presets, assets, py.typed)
    #    and the licences; nothing else
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"mammut_vl-{version}.dist-info/METADATA").decode()
        entry_points = z.read(f"mammut_vl-{version}.dist-info/entry_points.txt").decode()
    package_files = {p.relative_to(SRC).as_posix() for p in (SRC / "mammut").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert package_files - names == set()
    for must in ("mammut/configs/demo.yaml", "mammut/configs/tiny.yaml", "mammut/py.typed",
                 "mammut/data/assets/emoji.npz", "mammut/data/assets/NOTICE-emoji.txt",
                 f"mammut_vl-{version}.dist-info/licenses/LICENSE",
                 f"mammut_vl-{version}.dist-info/licenses/src/mammut/data/assets/NOTICE-emoji.txt"):
        assert must in names, must
    assert all(n.startswith(("mammut/", f"mammut_vl-{version}.dist-info/")) for n in names), sorted(names)
    assert "License-Expression: MIT AND OFL-1.1" in metadata
    # the tasks are found through their entry points (mammut.train.task.get_task): the demo trains one
    group = entry_points.replace("\r", "").split("[mammut.tasks]\n", 1)[-1].split("\n\n", 1)[0].splitlines()
    assert {"pretrain = mammut.tasks.pretrain:Pretrain", "vqa = mammut.tasks.vqa:Vqa",
            "interleaved = mammut.tasks.interleaved:Interleaved"} <= set(group), entry_points
    assert re.search(r"^Requires-Dist: torchvision>=[\d.]+; extra == \"train\"$", metadata, re.M)

    # 3. a fresh venv that sees this environment's third-party packages (torch is not copied;
    #    pip and setuptools too: a venv's own older setuptools would shadow the one torch needs)
    #    but not its editable mammut, then the wheel with its train extra, from no index
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    vpy = venv / "bin" / "python"
    vsite = Path(_run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      tmp_path, env).stdout.strip())
    (vsite / "_mammut_test_deps.pth").write_text(f"{_deps_only_site(tmp_path)}\n")
    _run([vpy, "-m", "pip", "install", "--no-index", "-q", f"{wheel}[train]"], tmp_path, env)
    _run([vpy, "-m", "pip", "check"], tmp_path, env)

    # 4. from an empty folder outside the checkout
    work = tmp_path / "empty"
    work.mkdir()
    probe = _run([vpy, "-c", "import json, mammut, torch, importlib.metadata as m; print(json.dumps("
                  "[mammut.__file__, torch.__file__, m.version('mammut-vl'), str(m.distribution('mammut-vl').locate_file(''))]))"],
                 work, env)
    mammut_file, torch_file, installed_version, dist_site = json.loads(probe.stdout)
    assert Path(mammut_file) == vsite / "mammut" / "__init__.py"  # the wheel's copy, not src/
    assert Path(dist_site) == vsite and installed_version == version  # its metadata, not the dev venv's
    assert not Path(torch_file).is_relative_to(vsite)  # torch comes from the dev environment
    for rel in ("configs/demo.yaml", "py.typed", "data/assets/emoji.npz", "data/assets/NOTICE-emoji.txt"):
        assert (vsite / "mammut" / rel).is_file(), rel
    assert (vsite / f"mammut_vl-{version}.dist-info" / "licenses" / "LICENSE").is_file()

    mammut_cli = venv / "bin" / "mammut"
    run = work / "run"
    proc = _run([mammut_cli, "demo", "--train.steps", "3", "--train.batch_size", "8", "--train.log_every", "1",
                 "--train.save_every", "0", "--train.threads", "1", "--train.progress", "false",
                 "--eval.n", "16", "--eval.batch_size", "16", "--eval.grid", "4", "--eval.max_new_tokens", "8",
                 "--train.out_dir", "run"], work, env, timeout=600)
    for name in ("metrics.json", "report.md"):
        assert (run / "report" / name).is_file(), f"{name} missing\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["retrieval"]["gallery_size"] == 16
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # nothing written beside the run folder

    out = _run([mammut_cli, "--version"], work, env).stdout
    assert version in out, out
