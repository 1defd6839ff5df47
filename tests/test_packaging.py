"""The distribution name is the documented one: pyproject's `name` is what README and every install hint say
(issue 23: `lsp` on the package index is another project, so `pip install 'lsp[hf]'` installed that)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = "lsp-hybrid"


def pyproject_name() -> str:
    # [project] name = "..." (tomllib is 3.11+; the project supports 3.10)
    text = (REPO / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^name = "([^"]+)"', project, re.M).group(1)


def install_hints(text: str):
    """Every distribution name in a `pip install 'NAME[extra]'` / `NAME[extra]` hint of the text."""
    return set(re.findall(r"(?<![\w.\-/])([A-Za-z][\w\-]*)\[(?:dev|hf|deepspeed|tokenizers|datasets)\]", text))


def test_pyproject_name_is_the_documented_one():
    assert pyproject_name() == DISTRIBUTION
    readme = (REPO / "README.md").read_text()
    assert f"pip install '{DISTRIBUTION}[hf]'" in readme


def test_every_install_hint_names_the_distribution():
    files = [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("configs/*.yaml"), *REPO.rglob("lsp/**/*.py"),
             *REPO.glob("tests/**/*.py")]
    wrong = {f"{f.relative_to(REPO)}: {name}" for f in files if f.name != Path(__file__).name
             for name in install_hints(f.read_text()) if name != DISTRIBUTION}
    assert wrong == set()


def test_the_hint_check_sees_a_wrong_name():
    # control: the old hint is caught; the editable install `pip install -e .[hf]` and `self.lsp[...]` are not hints
    assert install_hints("pip install 'lsp[hf]'") == {"lsp"}
    assert install_hints("pip install -e .[deepspeed] and self.lsp[name]") == set()
