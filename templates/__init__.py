"""The dashboard's Jinja2 templates. They live in the repository's top-level ``templates/``
directory and are installed as the package ``app.templates`` (pyproject.toml maps the one to
the other), so pages render from a wheel too: code finds them with
``importlib.resources.files("app.templates")``, never by a path relative to the source tree."""
