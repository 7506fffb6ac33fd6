"""README.md and docs/*.md: every ```python block runs, every train.py/evaluate.py command composes, links resolve.

A block fenced as ```python no-run is shown but not run (keep those rare)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose_cfg

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w[\w-]*)?([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks(lang: str) -> list[tuple[str, str]]:
    """(id, code) of every fenced block of ``lang`` (``python no-run`` blocks left out)."""
    out = []
    for doc in DOCS:
        for i, m in enumerate(b for b in FENCE.finditer(doc.read_text()) if b.group(1) == lang):
            if "no-run" not in m.group(2):
                out.append((f"{doc.relative_to(ROOT)}:{i}", m.group(3)))
    return out


PYTHON = blocks("python")


def test_the_docs_have_python_blocks():
    assert {name.split(":")[0] for name, _ in PYTHON} >= {"README.md", "docs/backward.md"}


@pytest.mark.parametrize("code", [c for _, c in PYTHON], ids=[n for n, _ in PYTHON])
def test_python_block_runs(code, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
    finally:
        torch.set_num_threads(threads)


def commands() -> list[tuple[str, str, list[str]]]:
    """(line, config name, overrides) of every ``python train.py`` / ``python evaluate.py`` line of a bash block,
    placeholders (<run dir>) replaced by a path and a sweep's comma lists by their first value. Lines that need a
    plugin of an extra (hparams_search, launcher) or set Hydra's own keys are left to tests/test_configs.py."""
    out = []
    for name, code in blocks("bash"):
        for line in code.splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            m = re.match(r"(?:time )?python (train|evaluate)\.py\b(.*)", line)
            if not m or re.search(r"hparams_search=|launcher=", line):
                continue
            args = []
            for tok in shlex.split(re.sub(r"<[^>]*>", "/tmp/placeholder", m.group(2))):
                if tok == "-m" or tok.startswith(("hydra.", "++hydra.")) or tok.startswith("--"):
                    continue
                key, _, value = tok.partition("=")
                if "," in value and not value.startswith(("[", "{")):
                    value = value.split(",")[0]
                args.append(f"{key}={value}")
            out.append((f"{name}: {line}", m.group(1), args))
    return out


COMMANDS = commands()


def test_the_readme_commands_are_checked():
    lines = [c[0] for c in COMMANDS]
    for wanted in ("python train.py method=luser_dw task=deblur", "python evaluate.py method=tv task=deblur",
                   "python train.py -m method=degrad backward=jfb,implicit,neumann"):
        assert any(ln.startswith("README.md") and wanted in ln for ln in lines), wanted


@pytest.mark.parametrize("config,overrides", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_command_composes(config, overrides, tmp_path):
    """Hydra refuses an unknown group option or key, so composing is the check; a dotted key must also be set."""
    cfg = compose_cfg(config, overrides, tmp_path)
    for o in overrides:
        key = o.partition("=")[0].lstrip("+~")
        if "." in key:
            assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", o


def test_readme_size_order_and_first_lines():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 300 and len(text.encode()) <= 25_000
    head = "\n".join(lines[:150])
    for wanted in ("python train.py method=luser_dw task=deblur", "python evaluate.py method=tv task=deblur",
                   "equilibrium("):
        assert wanted in head, wanted
    sections = [ln[3:] for ln in lines if ln.startswith("## ")]
    assert sections == ["Two commands", "Install", "Concepts: method x task x solver x backward", "Examples",
                        "Python API", "Results", "Layout", "Testing", "References"]


def test_links_between_the_docs_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).is_file(), f"{doc.name} links to missing {target}"


def test_report_sections_are_paired():
    for doc in DOCS:
        text = doc.read_text()
        for name in re.findall(r"<!-- report:([\w-]+) -->", text):
            assert text.count(f"<!-- report:{name} -->") == 1 and text.count(f"<!-- /report:{name} -->") == 1
            assert text.index(f"<!-- report:{name} -->") < text.index(f"<!-- /report:{name} -->")
