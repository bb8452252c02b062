"""The ``kalm-settings`` directive: the table of how two profiles differ, made at build time.

Why: the table must follow the root ``_config.yml`` (never typed by hand), so the page asks
:func:`kalm.settings.profile_differences` for it whenever the book is built, and the page is
rebuilt when the configuration file changes. Usage in a MyST chapter::

    ```{kalm-settings}
    :base: paper
    :other: cpu
    :dataset: wn18rr
    ```
"""

from __future__ import annotations

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


class SettingsTable(SphinxDirective):
    """Render ``profile_differences(base, other, dataset=...)`` as a table."""

    option_spec = {  # noqa: RUF012 (docutils reads this class attribute)
        "base": directives.unchanged,
        "other": directives.unchanged,
        "dataset": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        from kalm.config import config_path
        from kalm.settings import profile_differences

        base = self.options.get("base", "paper")
        other = self.options.get("other", "cpu")
        self.env.note_dependency(str(config_path()))
        try:
            table = profile_differences(base, other, dataset=self.options.get("dataset", "wn18rr"))
        except ValueError as err:  # a ConfigError: an unknown profile or dataset, a bad value
            raise self.error(f"kalm-settings: {err}") from err
        header = ["setting", "meaning", f"{base} profile", f"{other} profile"]
        rows = [[setting, *map(str, row)] for setting, row in table.iterrows()]
        return [_table(header, rows, widths=(22, 38, 20, 20))]


def _table(header: list[str], rows: list[list[str]], widths: tuple[int, ...]) -> nodes.table:
    """A docutils table of plain-text cells; configuration fields (``train.lr``) set as code."""
    group = nodes.tgroup(cols=len(header))
    group += [nodes.colspec(colwidth=w) for w in widths]

    def row(cells: list[str]) -> nodes.row:
        out = nodes.row()
        for i, text in enumerate(cells):
            field = i == 0 and "." in text
            inline = nodes.literal(text=text) if field else nodes.Text(text)
            out += nodes.entry("", nodes.paragraph("", "", inline))
        return out

    group += nodes.thead("", row(header))
    group += nodes.tbody("", *(row(r) for r in rows))
    return nodes.table("", group, classes=["kalm-settings", "colwidths-given"])


def setup(app: Sphinx) -> dict[str, bool]:
    """Register the ``kalm-settings`` directive."""
    app.add_directive("kalm-settings", SettingsTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
