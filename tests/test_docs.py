"""The docs hold against the code: every setting of app/config.py is on docs/configuration.md (and
the page names no setting that does not exist), every API route is on docs/api.md, every flag of
the CLIs is on docs/cli.md, the generated spec table is current, the README stays a short page whose
links all resolve, and no user doc speaks of issue numbers."""

from __future__ import annotations

import importlib.util
import re

import pytest
from pydantic import AliasChoices

from app.config import Settings
from tests.support.paths import REPO

DOCS = REPO / "docs"
USER_DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in DOCS.glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _env_names(name: str, field) -> list[str]:
    """The environment variables pydantic-settings reads a field from (its aliases, else the prefixed name)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [(Settings.model_config.get("env_prefix", "") + name).upper()]


def _page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_every_setting_is_on_the_configuration_page():
    page = _page("configuration.md")
    missing = [
        env
        for name, field in Settings.model_fields.items()
        for env in _env_names(name, field)
        if f"`{env}`" not in page
    ]
    assert not missing, f"docs/configuration.md does not describe these settings of app/config.py: {missing}"


def test_the_configuration_page_names_only_real_settings():
    """Above its last section (variables read by others: compose, the client, the tests), every
    SPARSEGPT_ name on the page is a setting the service reads: a renamed or removed one fails here."""
    page = _page("configuration.md")
    settings_part = page.split("## Variables outside the service's settings")[0]
    known = {env for name, field in Settings.model_fields.items() for env in _env_names(name, field)}
    stale = sorted(set(re.findall(r"\bSPARSEGPT_[A-Z0-9_]+\b", settings_part)) - known)
    assert not stale, f"docs/configuration.md names settings app/config.py does not have: {stale}"


def test_every_api_route_is_on_the_api_page(tmp_path):
    from app.main import create_app

    app = create_app(Settings(data_dir=tmp_path), migrate=False)
    page = _page("api.md")
    missing = []
    for path, operations in app.openapi()["paths"].items():
        shown = re.sub(r"\{(\w+_)?id\}", "{id}", path)  # {job_id}, {set_id}: {id} on the page
        missing += [f"{method.upper()} {shown}" for method in operations if f"`{method.upper()} {shown}`" not in page]
    assert not missing, f"docs/api.md does not list these routes: {missing}"


def _options(parser) -> set[str]:
    """Every option string of a parser and of its subcommands' parsers."""
    import argparse

    found = set()
    for action in parser._actions:
        found.update(s for s in action.option_strings if s not in ("-h", "--help"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def test_every_cli_flag_is_on_the_cli_page():
    from app.cli import build_parser as sparsegpt
    from worker.engine.cli import build_parser as prune

    page = _page("cli.md")
    missing = sorted(
        flag
        for flag in _options(sparsegpt()) | _options(prune())
        if f"`{flag}" not in page and not re.search(rf"[`\[ ]{re.escape(flag)}[ `\]=]", page)
    )
    assert not missing, f"docs/cli.md does not describe these flags: {missing}"


def test_the_spec_table_is_generated_from_the_spec():
    spec = importlib.util.spec_from_file_location("docs_tables", REPO / "scripts" / "docs_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    for page, blocks in tables.BLOCKS.items():
        text = (REPO / page).read_text(encoding="utf-8")
        assert tables.render(text, blocks) == text, f"{page} is stale: run .venv/bin/python scripts/docs_tables.py"
    table = tables.spec_table()
    for key, info in tables.spec_fields():  # each field's own description, as the form and the CLI show it
        description = (info.description or "").replace("|", "\\|").replace("<", "&lt;")
        assert f"| `{key}` |" in table and description in table, key


def test_the_readme_is_short_and_keeps_the_two_set_up_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "./scripts/serve" in readme and "./scripts/test" in readme


@pytest.mark.parametrize("doc", [*USER_DOCS, "CHANGELOG.md"])
def test_links_resolve(doc):
    """Every relative link of README and docs/ names a file of the repository (and, with #anchor, a
    heading of that page), so a page moved or renamed shows up here."""
    path = REPO / doc
    text = path.read_text(encoding="utf-8")
    bad = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            continue  # a URL or a route of the service
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            bad.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text(encoding="utf-8")):
            bad.append(target)
    assert not bad, f"{doc} links to missing files or headings: {bad}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_page_the_readme_links_exists():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    pages = {m.split("#")[0] for m in LINK.findall(readme) if m.startswith("docs/")}
    expected = {
        f"docs/{name}.md"
        for name in ("api", "cli", "configuration", "DEPLOY", "security", "engine", "benchmarks", "ARCHITECTURE")
    }
    assert expected <= pages, f"README does not link {sorted(expected - pages)}"
    assert all((REPO / page).is_file() for page in pages)


@pytest.mark.parametrize("doc", USER_DOCS)
def test_user_docs_tell_no_history(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    found = re.findall(r"\b[Ii]ssues? #?\d+", text)
    assert not found, f"{doc} speaks of issue numbers (history goes to CHANGELOG.md): {found}"
