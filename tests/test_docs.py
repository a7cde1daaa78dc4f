"""Every Python example in the documentation runs.

Each Markdown page of ``docs/`` (and ``README.md``, when there is one) is one test. Its fenced
blocks that open with ```` ```python ```` run in order, in one fresh namespace, so a page's
examples build on each other as a reader would type them; a block fails the test when it raises
(examples check what they claim with ``assert``).

A block opening with ```` ```python no-run ```` is shown to readers but not run: use it only for
code that cannot run here (a GPU, a package that is not installed, a placeholder path). Blocks in
other languages (``bash``, ``text``) are never run.

Pages run in a temporary working directory, so examples may write files (checkpoints) freely.

A last test checks that the API reference (``docs/api/``, in mkdocs.yml's nav) renders every
public name of ``asyncnn`` and of its public submodules.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [p for p in [ROOT / "README.md"] if p.exists()]

# A fence line: ``` or ~~~ (three or more), an info string, then the body up to a matching fence.
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
SKIP_WORDS = {"no-run", "norun", "skip"}


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, runs)`` of each ```python block of a Markdown text, in order."""
    blocks = []
    for m in _FENCE.finditer(text):
        words = m.group("info").strip().split()
        if not words or words[0] not in ("python", "py"):
            continue
        indent = len(m.group("indent"))
        body = "\n".join(line[indent:] for line in m.group("body").splitlines())
        line = text.count("\n", 0, m.start()) + 2  # the block's first line of code
        blocks.append((line, body, not SKIP_WORDS.intersection(words[1:])))
    return blocks


def test_the_extractor_reads_fences_and_skip_marks():
    text = (
        "intro\n```python\na = 1\n```\n\n```bash\nls\n```\n"
        "```python no-run\nimport cupy\n```\n  ```py\n  b = a + 1\n  ```\n"
    )
    blocks = python_blocks(text)
    assert [(code, runs) for _, code, runs in blocks] == [
        ("a = 1", True),
        ("import cupy", False),
        ("b = a + 1", True),
    ]
    assert blocks[0][0] == 3


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if page.parent.name == "docs" and page.name != "benchmarks.md":
        assert any(runs for _, _, runs in blocks), f"{page.name} has no runnable example"
    monkeypatch.chdir(tmp_path)
    # A real module object, registered while the page runs, so that classes defined in examples
    # (dataclasses, modules turned into specs) find their module as code in a file would.
    name = "asyncnn_docs_" + re.sub(r"\W", "_", page.stem)
    module = types.ModuleType(name)
    module.__file__ = str(page)
    monkeypatch.setitem(sys.modules, name, module)
    for line, code, runs in blocks:
        if not runs:
            continue
        compiled = compile(code, f"{page.name}:{line}", "exec")
        try:
            exec(compiled, module.__dict__)
        except Exception as exc:
            raise AssertionError(
                f"the example at {page.name} line {line} failed: {type(exc).__name__}: {exc}"
            ) from exc


def test_the_api_reference_renders_every_public_name():
    """Each public submodule has a page under ``docs/api/`` in mkdocs.yml's nav, and each public
    name is rendered there: by its module's ``::: asyncnn.sub`` or by its own ``:::`` line."""
    import asyncnn

    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    api = ROOT / "docs" / "api"
    rendered = {
        line.removeprefix(":::").strip()
        for page in api.glob("*.md")
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith(":::")
    }
    missing = []
    for name in asyncnn.__all__:
        value = getattr(asyncnn, name)
        if isinstance(value, types.ModuleType):
            if f"api/{name}.md" not in nav or not (api / f"{name}.md").exists():
                missing.append(f"a page api/{name}.md in mkdocs.yml's nav")
            if value.__name__ not in rendered:  # else each name on its own
                names = (f"{value.__name__}.{n}" for n in value.__all__)
                missing += [n for n in names if n not in rendered]
        elif f"asyncnn.{name}" not in rendered:
            missing.append(f"asyncnn.{name}")
    assert not missing, f"the API reference (docs/api/) does not render {missing}"
