"""The shape of the code base (docs/architecture.md): which package may import which, no import cycles, the REPL
and the runtime without torch; and the small shared pieces every package leans on (first_line, the defaults
table, the settings layering)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from runtime.defaults import BUILTIN, DEFAULT_GENERATION, generation_defaults
from runtime.errors import first_line
from runtime.sampling import SamplerSettings
from runtime.settings import KEYS, SettingError, Settings, build_settings, format_setting

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "train", "export", "runtime", "repl", "benchmarks")
# Which of the project's packages each package may import (itself always). runtime is the torch-free base.
ALLOWED = {
    "runtime": set(),
    "models": {"runtime"},
    "train": {"models", "runtime"},
    "export": {"models", "runtime"},
    "repl": {"runtime"},
    "benchmarks": {"models", "train", "export", "runtime", "repl"},
}
PENDING: set[tuple[str, str]] = set()  # known layering exceptions: none


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def _imports(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every first-party module ``path`` imports anywhere: top level, inside functions, under TYPE_CHECKING."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        yield from (name for name in names if name in known)


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: set(_imports(path, known)) - {name} for name, path in known.items()}


def test_packages_import_only_the_layers_below_them() -> None:
    wrong = []
    for module, targets in _graph().items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package] and (module, target) not in PENDING:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_import_graph_is_read_from_real_imports() -> None:
    """The graph above is built from real import statements (so the two tests above can fail)."""
    graph = _graph()
    assert "runtime.modelfile" in graph["export.onnx_export"]  # a top-level import
    assert "runtime.settings" in graph["repl.cli"]  # imported inside a function
    assert "repl.app" in graph["repl.cli"]


def test_repl_and_runtime_import_without_torch_train_models_or_export() -> None:
    """Every module of runtime/ and repl/ imports with torch made unimportable, and pulls in none of the training
    or export packages (which would bring torch back the moment they grow a top-level import)."""
    modules = sorted(name for name in _modules() if name.split(".")[0] in ("runtime", "repl")
                     and not name.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None  # `import torch` now raises ImportError\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'train', 'models', 'export'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert "runtime.settings" in modules and "repl.app" in modules and "repl.evaluate" in modules


@pytest.mark.parametrize(("error", "expected"), [
    (ValueError("bad value"), "bad value"),
    (RuntimeError("\n\n  first line  \nsecond line\n"), "first line"),
    (KeyError(), "KeyError"),
    (OSError(""), "OSError"),
    ("", ""),
    ("plain text\nmore", "plain text"),
])
def test_first_line(error: BaseException | str, expected: str) -> None:
    assert first_line(error) == expected


def test_first_line_cuts_long_lines_to_the_limit() -> None:
    text = first_line(ValueError("x" * 500), limit=50)
    assert len(text) == 50 and text.endswith("...")
    assert first_line(ValueError("short"), limit=50) == "short"


def test_builtin_defaults_cover_every_setting_and_match_the_sampler() -> None:
    assert list(BUILTIN) == list(KEYS)
    sampler_defaults = asdict(SamplerSettings())
    assert sampler_defaults == {key: BUILTIN[key] for key in sampler_defaults}
    settings = Settings()
    assert settings.as_dict() == BUILTIN
    assert {source for _, _, source, _ in settings.rows()} == {"default"}


def test_generation_defaults_per_tokenizer() -> None:
    assert generation_defaults("bpe") == DEFAULT_GENERATION
    assert generation_defaults("char") == {**DEFAULT_GENERATION, "top_k": 0, "top_p": 1.0, "max_new_tokens": 500}
    assert generation_defaults("word") == {**DEFAULT_GENERATION, "max_new_tokens": 100}
    generation_defaults("char")["top_k"] = 7  # a copy: the table itself is not changed
    assert generation_defaults("char")["top_k"] == 0


def test_settings_layer_builtin_model_cli_then_set() -> None:
    settings = build_settings({"temperature": 0.6, "top_k": 10}, [("top_k", "20")], {"seed": "3"})
    assert (settings.get("temperature"), settings.source("temperature")) == (0.6, "model")
    assert (settings.get("top_k"), settings.source("top_k")) == (20, "cli")
    assert (settings.get("seed"), settings.source("seed")) == (3, "cli")
    assert (settings.get("top_p"), settings.source("top_p")) == (BUILTIN["top_p"], "default")
    settings.set("top_k", "5")
    assert (settings.get("top_k"), settings.source("top_k")) == (5, "set")
    settings.unset("top_k")
    assert (settings.get("top_k"), settings.source("top_k")) == (10, "model")  # back to the model file's value
    settings.unset("seed")
    assert (settings.get("seed"), settings.source("seed")) == (None, "default")


def test_settings_layer_presets_in_order() -> None:
    greedy_then_temp = build_settings({}, [("sampler", "greedy"), ("temperature", "0.5")])
    assert greedy_then_temp.get("temperature") == 0.5 and greedy_then_temp.source("num_beams") == "cli"
    temp_then_greedy = build_settings({}, [("temperature", "0.5")], [("sampler", "greedy")])
    assert temp_then_greedy.get("temperature") == 0.0
    as_given = build_settings({"top_k": 10}, [("top_k", "3")], {"sampler": "sample"})
    assert as_given.get("top_k") == 3  # "sample" on the command line keeps the values given beside it
    with pytest.raises(SettingError, match="unknown sampler preset"):
        build_settings({}, [("sampler", "fancy")])
    with pytest.raises(SettingError, match="unknown setting"):
        build_settings({}, [("tempreature", "1")])


@pytest.mark.parametrize(("value", "shown"), [(None, "none"), (0.8, "0.8"), (40, "40"), ("a\n", '"a\\n"'),
                                              (["x", "y"], '["x", "y"]'), (1e-06, "1e-06")])
def test_format_setting(value: object, shown: str) -> None:
    assert format_setting(value) == shown
