"""The README's promises about the repository itself: CI runs its test command, its map matches the tree."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _command_after(line: str) -> str:
    """The indented command block that follows the README line starting with `line`, joined into one line."""
    rest = README[README.index(line):].split("\n")[1:]
    block = []
    for text in rest[1:] if not rest[0].strip() else rest:
        if not text.startswith("    "):
            break
        block.append(text.strip())
    return " ".join(block).replace("\\ ", "")


def test_ci_runs_the_readme_test_command_verbatim():
    command = _command_after("Set up and run the tests")
    assert command.endswith("python -m pytest -q")
    ci = " ".join(line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()).replace("\\ ", "")
    assert command in ci


def test_the_readme_map_matches_the_tree():
    section = README[README.index("## Where things live"):].split("\n## ")[0]
    mapped = {p.rstrip("/") for row in section.splitlines() if row.startswith("| `")
              for p in re.findall(r"`([\w./]+)`", row.split("|")[1])}
    for path in mapped:
        assert (ROOT / path).exists(), f"the README's map names {path}, which is not in the tree"
    package = ROOT / "planer"
    modules = {f"planer/{p.name}" for p in package.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    missing = sorted(modules - mapped)
    assert not missing, f"the README's map leaves out {missing}"
