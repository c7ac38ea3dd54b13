"""One registry of the DIFFAUG_* environment variables: the code reads no other, the docs list every one."""
import re
from pathlib import Path

import pytest

from nnunet_diffaug import env_vars
from nnunet_diffaug.errors import DiffAugError

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- DIFFAUG_ENV_TABLE:START -->", "<!-- DIFFAUG_ENV_TABLE:END -->"
NOT_VARIABLES = {"DIFFAUG_TRAINER", "DIFFAUG_ENV_TABLE"}  # a Python constant and the docs table marker


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"\bDIFFAUG_[A-Z][A-Z_]*[A-Z]\b", text)) - NOT_VARIABLES


def test_every_variable_the_code_or_docs_name_is_registered():
    sources = [*(REPO / "nnunet_diffaug").rglob("*.py"), *(REPO / "benchmarks").glob("*.py"),
               REPO / "README.md", *(REPO / "docs").glob("*.md")]
    named = {name: path for path in sources for name in _names_in(path.read_text())}
    unknown = {name: str(path.relative_to(REPO)) for name, path in named.items() if name not in env_vars.REGISTRY}
    assert not unknown, f"not in nnunet_diffaug/env_vars.py: {unknown}"


def test_no_module_but_the_registry_spells_a_variable_as_a_string():
    literal = re.compile(r"""["'](DIFFAUG_[A-Z_]+)["']""")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "nnunet_diffaug").rglob("*.py")
                 if p.name != "env_vars.py" and set(literal.findall(p.read_text())) - NOT_VARIABLES]
    assert not offenders, f"import the name from nnunet_diffaug.env_vars instead: {offenders}"


def test_the_docs_table_is_the_generated_one():
    page = (REPO / "docs" / "trainer.md").read_text()
    assert START in page and END in page, "docs/trainer.md lost its table markers"
    table = page.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == env_vars.markdown_table(), (
        "docs/trainer.md's DIFFAUG_* table differs from the registry; regenerate it with\n"
        "python -c 'from nnunet_diffaug.env_vars import markdown_table; print(markdown_table())'")
    assert _names_in(table) == set(env_vars.REGISTRY)


@pytest.mark.parametrize("raw, message", [("lots", "is not a number"), ("1.5", r"must lie in \[0.0, 1.0\]")])
def test_bad_values_are_refused_with_the_variable_named(monkeypatch, raw, message):
    monkeypatch.setenv(env_vars.SYNTHETIC_RATIO, raw)
    with pytest.raises(DiffAugError, match=f"DIFFAUG_SYNTHETIC_RATIO='{raw}' {message}"):
        env_vars.env_float(env_vars.SYNTHETIC_RATIO, 0.3, 0.0, 1.0)
    monkeypatch.setenv(env_vars.MIRRORING, "perhaps")
    with pytest.raises(DiffAugError, match="DIFFAUG_MIRRORING='perhaps' must be 1 or 0"):
        env_vars.env_flag(env_vars.MIRRORING, True)
