"""The docs say only what the code and the tests show."""

import re

from tests.engine import REPO
from vllm_kunlun import envs


def test_every_environment_variable_is_documented():
    table = (REPO / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, flags=re.MULTILINE))
    read_by_code = {var.name for var in envs.ALL}
    assert read_by_code == documented


def test_code_reads_environment_only_through_envs():
    pattern = re.compile(r"os\.environ\.get\(|os\.getenv\(|environ\[[\"']VLLM_KUNLUN")
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "vllm_kunlun").rglob("*.py")
        if path.name != "envs.py" and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_support_matrix_names_only_existing_tests():
    matrix = (REPO / "docs" / "support-matrix.md").read_text()
    references = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", matrix)
    assert references
    for path, test_name in references:
        source = REPO / path
        assert source.exists(), f"support matrix names missing file {path}"
        if test_name:
            assert f"def {test_name}(" in source.read_text(), f"{path}::{test_name} is missing"


#: Test files whose every test is a row (or part of a row) of the support matrix.
MATRIX_TEST_FILES = ("test_models.py", "test_feature_matrix.py", "test_tensor_parallel.py",
                     "test_serving_faults.py", "test_soak.py", "test_guard_rails.py",
                     "test_embedding.py", "test_routes.py", "test_moe_models.py",
                     "test_moe_layer.py", "test_expert_parallel.py", "test_quantized_models.py",
                     "test_quantization_config.py", "test_quantization_layer.py",
                     "test_quantized_moe_layer.py", "test_quantized_accuracy.py",
                     "test_wna16_layer.py", "test_mla_models.py")  # fmt: skip


def test_support_matrix_cites_every_matrix_test():
    """The other direction: a new architecture or feature test cannot miss its matrix row."""
    matrix = (REPO / "docs" / "support-matrix.md").read_text()
    for name in MATRIX_TEST_FILES:
        source = (REPO / "tests" / name).read_text()
        for test in re.findall(r"^def (test_\w+)\(", source, flags=re.MULTILINE):
            assert f"tests/{name}::{test}`" in matrix, f"support matrix misses tests/{name}::{test}"


def test_readme_names_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


# The pages a reader follows: README, docs/ and the contribution files at the root.
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] + [
    REPO / name
    for name in ("CONTRIBUTING.md", "GOVERNANCE.md", "CODE_OF_CONDUCT.md", "MAINTAINERS.md",
                 "CHANGELOG.md")
]  # fmt: skip
# Log lines and error messages quoted in the docs that start like a command.
QUOTED_MESSAGES = ("vllm-kunlun kernel provider:", "vllm-kunlun does not", "vllm-kunlun expects",
                   "vllm-kunlun cannot")  # fmt: skip


def code_of(text: str) -> list[str]:
    """Fenced code blocks (line by line) and inline code spans of a Markdown page."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", prose)


def test_the_governance_and_contribution_files_exist():
    missing = [str(page.relative_to(REPO)) for page in PAGES if not page.is_file()]
    assert not missing


def test_readme_names_exactly_the_two_setup_commands_and_links_the_docs():
    readme = (REPO / "README.md").read_text()
    targets = {m for snippet in code_of(readme) for m in re.findall(r"\bmake (\w[\w-]*)", snippet)}
    assert targets == {"demo", "test"}
    for page in ("installation", "quickstart", "architecture", "configuration", "support-matrix",
                 "benchmarks", "serving", "distributed", "troubleshooting"):  # fmt: skip
        assert f"(docs/{page}.md" in readme, f"README does not link docs/{page}.md"


def test_relative_links_outside_the_docs_site_resolve():
    """docs/ links are checked by the strict MkDocs build; the root pages are checked here."""
    for page in PAGES:
        if page.parent == REPO / "docs":
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.name} links to missing {target}"


def test_documented_commands_exist():
    from vllm_kunlun.cli import NEEDS_DEVICE, PLUGIN_COMMANDS

    commands = {*PLUGIN_COMMANDS, *NEEDS_DEVICE, "chat", "complete"}
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    make_targets = set(phony.group(1).split())
    for page in PAGES:
        for snippet in code_of(page.read_text()):
            if snippet.startswith(QUOTED_MESSAGES):
                continue
            for command in re.findall(r"(?:^|&&\s*)vllm-kunlun (\w[\w-]*)", snippet):
                assert command in commands, f"{page.name}: `vllm-kunlun {command}` does not exist"
            for target in re.findall(r"(?:^|&&\s*)make (\w[\w-]*)", snippet):
                assert target in make_targets, f"{page.name}: `make {target}` does not exist"


def test_documented_plugin_variables_exist():
    known = {var.name for var in envs.ALL}
    for page in PAGES:
        named = set(re.findall(r"\bVLLM_KUNLUN_[A-Z_]*[A-Z]\b", page.read_text()))
        assert named <= known, f"{page.name} names unknown variables {named - known}"
