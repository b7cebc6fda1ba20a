"""The report document: the same content in Markdown and in escaped HTML."""

from __future__ import annotations

from caloadapt.evaluate.report import Document


def test_document_renders_markdown_and_escaped_html():
    doc = Document()
    doc.heading(2, "Scores <G>")
    doc.paragraph("caloadapt evaluate --out a|b", code=True)
    doc.items(["one", "two & three"])
    doc.items([])  # empty blocks are left out
    doc.table(["observable", "W1"], [["energy | ratio", "0.1"], ["hits", "0.2"]])
    doc.table(["nothing"], [])
    doc.image("longitudinal profile", "plots/profile.png")
    md = doc.markdown()
    assert md.startswith("## Scores <G>\n")
    assert "`caloadapt evaluate --out a|b`" in md
    assert "- one\n- two & three" in md
    assert "| energy \\| ratio | 0.1 |" in md and "|---|---|" in md and "nothing" not in md
    assert "![longitudinal profile](plots/profile.png)" in md
    html = doc.html("report <1>")
    assert "<title>report &lt;1&gt;</title>" in html and "<h2>Scores &lt;G&gt;</h2>" in html
    assert "<li>two &amp; three</li>" in html and "<td>energy | ratio</td>" in html
    assert '<img src="plots/profile.png" alt="longitudinal profile">' in html
    assert html.count("<table>") == 1
