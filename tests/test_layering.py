"""The layers the imports obey: the contracts of ``[tool.importlinter]`` in pyproject.toml hold
(``lint-imports``), they see imports inside functions, the library never imports the
application (an AST scan as well, independent of import-linter), no library module imports a
mammut module by name at run time, and ``mammut.load`` of a run folder runs without the
training stack."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYPROJECT = ROOT / "pyproject.toml"

APPLICATION = ("apps", "cli", "data", "eval", "inference", "tasks", "train")
LIBRARY = ("_version", "checks", "clip_tokenizer", "constants", "convert", "embedder", "encoders", "generation", "io",
           "layers", "loading", "losses", "models", "precision", "preprocess", "runs", "tokenizer", "transforms")
TRAINING_STACK = tuple(f"mammut.{name}" for name in APPLICATION)


def top_level_modules(src: Path = SRC) -> set[str]:
    """The modules and packages directly under ``mammut`` (``configs`` holds data, not code)."""
    root = src / "mammut"
    out = {p.stem for p in root.glob("*.py") if p.name != "__init__.py"}
    out |= {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return out


def contracts() -> list[dict]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]


def lint_imports(cwd: Path, env: dict[str, str] | None = None, config: Path | None = None) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter")
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]
    cmd += ([str(config)] if config else []) + ["--no-cache"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- import-linter


def test_the_import_contracts_hold():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and f"{len(contracts())} kept" in proc.stdout
    assert "ignored import" not in proc.stdout  # test_no_import_is_ignored


def test_no_import_is_ignored():
    """No contract lists an import it lets through (the task registry, once known debt, lives in
    mammut.train.task now, the tasks found through entry points); lint-imports reports none ignored
    (test_the_import_contracts_hold)."""
    assert [c["name"] for c in contracts() if "ignore_imports" in c] == []


def test_the_contracts_name_every_top_level_module():
    """A new top-level module must be placed: in a layer (the layers contract is exhaustive) and
    on the right side of the library / application split and of the io leaf contract."""
    tops = top_level_modules()
    assert tops == set(APPLICATION) | set(LIBRARY), sorted(tops ^ (set(APPLICATION) | set(LIBRARY)))
    by_name = {c["name"]: c for c in contracts()}
    layers = next(c for c in contracts() if c["type"] == "layers")
    assert layers["exhaustive"] and layers["containers"] == ["mammut"]
    placed = {m.strip() for layer in layers["layers"] for m in layer.replace(":", "|").split("|")}
    assert placed == tops
    split = by_name["The library never imports the application"]
    assert {m.removeprefix("mammut.") for m in split["source_modules"]} == set(LIBRARY)
    assert {m.removeprefix("mammut.") for m in split["forbidden_modules"]} == set(APPLICATION)
    leaf = next(c for c in contracts() if c.get("source_modules") == ["mammut.io"])
    assert {m.removeprefix("mammut.") for m in leaf["forbidden_modules"]} == tops - {"io", "_version"}


def _copy_package(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(SRC / "mammut", src / "mammut", ignore=shutil.ignore_patterns("__pycache__", "assets", "configs"))
    return src


@pytest.mark.parametrize("where, code, broken", [
    # an import inside a function counts: the library reaching into the training stack
    ("models/_captioner.py", "\n\ndef _sneaky():\n    from ..train.config import ConfigError\n    return ConfigError\n",
     ["The library never imports the application", "Layers:", "No cycle between the top-level packages"]),
    # io importing the model registry, lazily: no longer a leaf
    ("io/atomic.py", "\n\ndef _sneaky():\n    from ..models import get_model_class\n    return get_model_class\n",
     ["mammut.io is a leaf", "Layers:", "No cycle between the top-level packages"]),
    # generation importing the models again: a cycle (models use generation)
    ("generation/loop.py", "\n\ndef _sneaky():\n    from ..models._base import ModelBase\n    return ModelBase\n",
     ["No cycle between the top-level packages", "Layers:"]),
], ids=["library-imports-train", "io-imports-models", "generation-models-cycle"])
def test_the_contracts_catch_a_function_level_import(tmp_path, where, code, broken):
    """lint-imports (grimp) reads imports inside functions: one added to a copy of the package
    breaks the contract it should."""
    src = _copy_package(tmp_path)
    path = src / "mammut" / where
    path.write_text(path.read_text(encoding="utf-8") + code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "400"}
    proc = lint_imports(ROOT, env=env, config=PYPROJECT)
    assert proc.returncode != 0, proc.stdout[-3000:]
    verdicts = [m.groups() for line in proc.stdout.splitlines()
                if (m := re.match(r"^(.+) (KEPT|BROKEN)(?: \(\d+ ignored imports?\))?$", line))]
    assert len(verdicts) == len(contracts()), proc.stdout[-3000:]
    names = [name for name, verdict in verdicts if verdict == "BROKEN"]
    assert len(names) == len(broken) and all(any(n.startswith(b) for n in names) for b in broken), proc.stdout[-3000:]


# ----------------------------------------------------------------------------- an AST scan


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """Every ``mammut`` module that ``path`` imports (at module level, inside functions, under
    TYPE_CHECKING; relative imports resolved) and every string given to ``import_module`` /
    ``__import__``, with its line."""
    is_package = path.name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (package[: len(package) - (node.level - 1)] if node.level else []) + ([node.module] if node.module else [])
            out.append((".".join(base), node.lineno))
            out += [(".".join(base + [a.name]), node.lineno) for a in node.names]
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                out.append((str(node.args[0].value), node.lineno))
    return [(name, line) for name, line in out if name == "mammut" or name.startswith("mammut.")]


def library_files(src: Path = SRC):
    for name in LIBRARY:
        base = src / "mammut" / name
        paths = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        for path in paths:
            parts = list(path.relative_to(src).with_suffix("").parts)
            yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def application_imports(src: Path = SRC) -> list[str]:
    found = []
    for path, module in library_files(src):
        for name, line in imports_of(path, module):
            if name.startswith(TRAINING_STACK) and name.split(".")[1] in APPLICATION:
                found.append(f"{module} line {line}: {name}")
    return found


def test_no_library_module_imports_the_application():
    """Independent of import-linter: no import statement anywhere in a library module (inside a
    function included) names mammut.train, .data, .tasks, .eval, .apps, .cli or .inference."""
    assert application_imports() == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    src = _copy_package(tmp_path)
    path = src / "mammut" / "models" / "_captioner.py"
    path.write_text(path.read_text(encoding="utf-8") + "\n\ndef _f():\n    from ..train import loop\n", encoding="utf-8")
    found = application_imports(src)
    assert found and all(f.startswith("mammut.models._captioner line ") for f in found) and "mammut.train.loop" in found[-1]


# dynamic importers whose argument is not a literal: (module, function) -> why that is fine
DYNAMIC_WRAPPERS = {("mammut.encoders.external", "_require"): "imports a third-party package named by its callers"}


def dynamic_imports(path: Path, module: str) -> list[str]:
    """Calls that import a module named at run time: ``import_module`` / ``__import__`` /
    ``_require`` with a literal naming mammut (or relative), or with a non-literal outside the
    known wrappers."""
    found: list[str] = []

    class Visitor(ast.NodeVisitor):
        function = ""

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            outer, self.function = self.function, node.name
            self.generic_visit(node)
            self.function = outer

        visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

        def visit_Call(self, node: ast.Call) -> None:
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in ("import_module", "__import__", "_require") and node.args:
                arg = node.args[0]
                literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                if (literal and arg.value.startswith(("mammut", "."))) or (
                        not literal and (module, self.function) not in DYNAMIC_WRAPPERS):
                    found.append(f"{module} line {node.lineno}: {ast.unparse(node)[:80]}")
            self.generic_visit(node)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def test_no_library_module_imports_mammut_by_name_at_run_time():
    """``importlib.import_module("mammut.x")`` is invisible to the contracts: the library has none
    (Model.from_open_clip reaches the converters through a registered lookup; the model registry
    imports its architectures by name)."""
    assert [f for path, module in library_files() for f in dynamic_imports(path, module)] == []


def test_the_dynamic_import_scan_catches_one(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import importlib\n\ndef f(name):\n    importlib.import_module('mammut.convert')\n"
                    "    return importlib.import_module(name)\n")
    assert len(dynamic_imports(path, "mammut.models._base")) == 2


def test_every_architecture_module_is_imported_by_the_registry():
    """The registry imports its architectures by name in ``_load_all`` (no discovery): every
    module of mammut.models that registers a model is listed there."""
    import inspect

    import mammut.models as models

    registering = {p.stem for p in Path(models.__file__).parent.glob("*.py")
                   if "@register_model(" in p.read_text(encoding="utf-8")}
    tree = ast.parse(inspect.getsource(models._load_all))
    listed = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1 for a in node.names}
    assert listed == registering
    assert {models.get_model_class(n).__module__.rsplit(".", 1)[1] for n in models.list_models()} == registering


def test_the_run_reader_defaults_are_the_run_configs():
    from mammut.runs import DATA_DEFAULTS
    from mammut.train.config import DataConfig

    assert {k: getattr(DataConfig(), k) for k in DATA_DEFAULTS} == DATA_DEFAULTS


def test_shared_constants_live_below_tasks_and_train():
    from mammut import constants, losses
    from mammut.train import build

    assert build.MEDIA_TOKEN is constants.MEDIA_TOKEN == "<image>" and losses.IGNORE_INDEX is constants.IGNORE_INDEX == -100
    from mammut.data import tokenizer as old
    from mammut import tokenizer as new

    assert old.Tokenizer is new.Tokenizer and old.train_bpe is new.train_bpe  # the old import path still works


# ----------------------------------------------------------------------------- run folders

TRAIN_ARGS = ["train", "--config", "tiny", "--train.steps", "2", "--train.batch_size", "8", "--train.threads", "1",
              "--train.progress", "false", "--train.report", "false", "--train.save_every", "1", "--eval.n", "8",
              "--eval.max_new_tokens", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from mammut.cli import main

    out = tmp_path_factory.mktemp("run") / "run"
    assert main([*TRAIN_ARGS, "--train.out_dir", str(out)]) == 0
    assert (out / "model" / "config.json").is_file()  # mammut train exports the final weights
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _newer(path: Path, than: Path) -> None:
    """Make ``path`` written a minute after ``than``."""
    t = than.stat().st_mtime + 60
    os.utime(path, (t, t))


def _loads_without_the_training_stack(source: Path) -> dict:
    code = ("import json, sys, mammut\n"
            f"model, preprocess, tokenizer = mammut.load({str(source)!r})\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({TRAINING_STACK!r}))))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_run_loads_without_the_training_stack(run_dir, tmp_path):
    """mammut.load(RUN) reads the export, and a run without one (interrupted, older) its
    checkpoint and config.yaml, and neither imports mammut.train, .data, .tasks, .eval, ..."""
    assert _loads_without_the_training_stack(run_dir) == []
    run = _copy(run_dir, tmp_path)
    shutil.rmtree(run / "model")
    assert _loads_without_the_training_stack(run) == []


def test_a_run_gives_its_export_unless_a_checkpoint_is_newer(run_dir, tmp_path, caplog):
    import logging

    import mammut
    from mammut.inference import load_run
    from mammut.runs import load_run_model

    run = _copy(run_dir, tmp_path)
    newest = run / "checkpoints" / "step_00000002"
    assert load_run_model(run).source == run / "model"
    reference = load_run(run)  # the training stack's reader: the newest checkpoint
    model, preprocess, tokenizer = mammut.load(run)
    for a, b in zip(model.state_dict().values(), reference.model.state_dict().values()):
        assert torch.equal(a, b)
    assert tokenizer.context_length == reference.config.data.max_len and preprocess.image_size == reference.config.data.image_size

    # the run went on after its export (a resume, interrupted): the newer checkpoint wins, said in the log
    with torch.no_grad():
        for p in reference.model.parameters():
            p.add_(1.0)
    from mammut.train.checkpointing import save_weights

    save_weights(reference.model.state_dict(), newest / "model.safetensors")
    (newest / "manifest.json").unlink()  # an older checkpoint layout: verified by structure
    _newer(newest / "model.safetensors", run / "model" / "config.json")
    with caplog.at_level(logging.INFO, logger="mammut.runs"):
        got = load_run_model(run)
    assert got.source == newest and "older than checkpoint step_00000002" in caplog.text
    assert torch.equal(next(iter(got.model.state_dict().values())), next(iter(reference.model.state_dict().values())))

    # the export written after it again: the export
    _newer(run / "model" / "config.json", newest / "model.safetensors")
    assert load_run_model(run).source == run / "model"

    # no export: the newest checkpoint that verifies; checkpoint= picks one
    shutil.rmtree(run / "model")
    assert load_run_model(run).source == newest
    assert load_run_model(run, run / "checkpoints" / "step_00000001").source.name == "step_00000001"


def test_a_run_without_weights_is_named(run_dir, tmp_path):
    import mammut

    run = _copy(run_dir, tmp_path)
    shutil.rmtree(run / "model")
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint with model.safetensors under"):
        mammut.load(run)
