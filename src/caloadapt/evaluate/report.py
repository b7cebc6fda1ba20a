"""The evaluation report: ``report.md`` and a self-contained ``report.html`` from the metrics dict.

Both files hold the same content: the inputs and notes, a summary table of the headline numbers,
the CaloTransfer score table (normalised W1 with its bootstrap standard deviation, KL, geometric
mean), the scores per incident-energy decade, the CaloChallenge numbers where present (classifier
AUC/JSD, FPD/KPD x 10^3, separation powers), the plots (linked relatively, e.g. ``plots/x.png``),
the timing and the software versions. The HTML uses no external CSS or JavaScript.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping
from pathlib import Path

from .._atomic import atomic_path

__all__ = ["write_report", "PLOT_CAPTIONS"]

#: plot name -> caption, in the order of the report
PLOT_CAPTIONS: dict[str, str] = {
    "scores": "Normalised W1 per observable (bootstrap std as error), all showers and per energy decade",
    "hist_energy_ratio": "Energy ratio E_vis / E_inc",
    "hist_visible_energy_mev": "Visible energy",
    "hist_n_hits": "Number of hits",
    "hist_cell_energy_mev": "Cell energy spectrum (all hit cells)",
    "hist_depth_cog_mm": "Longitudinal centre of gravity",
    "hist_radius_cog_mm": "Radial centre of gravity",
    "hist_cog_x_mm": "Centre of gravity x",
    "hist_cog_y_mm": "Centre of gravity y",
    "profile_longitudinal": "Longitudinal profile: mean energy per layer",
    "profile_radial": "Radial profile: mean energy per radial bin",
    "energy_bins": "Per incident-energy decade",
    "average_shower": "Average shower, selected layers",
    "separation_power": "CaloChallenge separation power per feature family",
    "event_display": "Event display: first showers of each sample",
}


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"


def _pm(value, error, digits: int = 4) -> str:
    text = _number(value, digits)
    if text != "n/a" and error is not None and _number(error) != "n/a":
        text += f" ± {_number(error, 2)}"
    return text


# -- a tiny document model rendered twice -------------------------------------------------------------
class Document:
    """A report built from headings, paragraphs, tables and images, rendered to Markdown or HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str, code: bool = False) -> None:
        self.blocks.append(("paragraph", text, code))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("list", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        if rows:
            self.blocks.append(("table", header, rows))

    def image(self, caption: str, link: str) -> None:
        self.blocks.append(("image", caption, link))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out.append(f"{'#' * block[1]} {block[2]}\n")
            elif kind == "paragraph":
                out.append(f"`{block[1]}`\n" if block[2] else f"{block[1]}\n")
            elif kind == "list":
                out.append("\n".join(f"- {item}" for item in block[1]) + "\n")
            elif kind == "table":
                header, rows = block[1], block[2]
                cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
                lines = ["| " + " | ".join(cell(h) for h in header) + " |",
                         "|" + "|".join("---" for _ in header) + "|"]
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines) + "\n")
            elif kind == "image":
                out.append(f"![{block[1]}]({block[2]})\n")
        return "\n".join(out)

    def html(self, title: str) -> str:
        esc = html.escape
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                body.append(f"<p><code>{esc(block[1])}</code></p>" if block[2] else f"<p>{esc(block[1])}</p>")
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{esc(str(h))}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                               for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "image":
                body.append(f'<figure><img src="{esc(block[2], quote=True)}" alt="{esc(block[1], quote=True)}">'
                            f"<figcaption>{esc(block[1])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
                 "th,td{border:1px solid #bbb;padding:3px 8px;text-align:left;font-size:0.92em}"
                 "th{background:#eee}img{max-width:100%;border:1px solid #ddd}"
                 "figure{margin:1em 0 2em}figcaption{font-size:0.9em;color:#555}"
                 "code{background:#f4f4f4;padding:1px 4px;word-break:break-all}")
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{esc(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


# -- content ----------------------------------------------------------------------------------------
def _lookup(values: Mapping, key):
    """``values[key]``, or a nested value for a tuple key; None where missing."""
    for part in key if isinstance(key, tuple) else (key,):
        if not isinstance(values, Mapping) or part not in values:
            return None
        values = values[part]
    return values


def _headline(section: Mapping) -> list[tuple[str, str, object]]:
    """The summary rows of one comparison (the model's or the floor's): label, text, ratio key."""
    summary = section.get("summary", {})
    classifier = section.get("classifier") or {}
    physics = section.get("fpd_kpd") or {}
    rows = [("geometric mean of normalised W1 (CaloTransfer, 6 observables)",
             _pm(summary.get("geometric_mean"), summary.get("geometric_mean_std")), "geometric_mean"),
            ("geometric mean of KL [nats]", _number(summary.get("kl_geometric_mean")), "kl_geometric_mean")]
    for key, name in (("low_level", "low-level"), ("high_level", "high-level")):
        record = classifier.get(key) or {}
        if "auc" in record:
            rows.append((f"classifier AUC ({name})", _number(record["auc"]), None))
            rows.append((f"classifier JSD ({name})", _number(record["jsd"]), f"jsd_{key}"))
        elif record.get("skipped"):
            rows.append((f"classifier ({name})", f"skipped: {record['skipped']}", None))
    if physics.get("skipped"):
        rows.append(("FPD, KPD", "skipped (see notes)", None))
    elif physics:
        rows.append(("FPD x 10^3", _pm(physics.get("fpd_x1e3"), physics.get("fpd_error_x1e3"))
                     if "fpd_x1e3" in physics else f"skipped: {physics.get('fpd_skipped')}", "fpd_x1e3"))
        rows.append(("KPD x 10^3", _pm(physics.get("kpd_x1e3"), physics.get("kpd_error_x1e3"))
                     if "kpd_x1e3" in physics else f"skipped: {physics.get('kpd_skipped')}", "kpd_x1e3"))
    for kind in ("energy", "theta"):
        for label, value in (summary.get(f"geometric_mean_by_{kind}") or {}).items():
            rows.append((f"geometric mean of normalised W1, {label}", _number(value),
                         (f"geometric_mean_by_{kind}", label)))
    return rows


def _build(metrics: Mapping, plot_links: Mapping[str, str]) -> Document:
    doc = Document()
    geometry = metrics.get("geometry", {})
    inputs = metrics.get("inputs", {})
    doc.heading(1, "caloadapt evaluation")
    doc.paragraph(f"Target geometry {geometry.get('name')} ({geometry.get('n_cells')} cells, "
                  f"{geometry.get('n_layers')} layers, threshold {_number(geometry.get('threshold_mev'))} MeV); "
                  f"created {metrics.get('created', '')}.")
    if metrics.get("command"):
        doc.paragraph(metrics["command"], code=True)

    doc.heading(2, "Inputs")
    rows = []
    for role in ("reference", "generated", "floor"):
        record = inputs.get(role)
        if not record:
            continue
        energy = record.get("incident_energy_gev") or [None, None]
        rows.append([role, record.get("path"), record.get("format"), record.get("geometry"), record.get("particle"),
                     f"{record.get('n_showers_used')} / {record.get('n_showers_in_file')}",
                     f"{_number(energy[0], 3)}-{_number(energy[1], 3)}",
                     _number(record.get("energy_outside_target_fraction"), 3)])
    doc.table(["sample", "file", "format", "file geometry", "particle", "showers used / in file",
               "E_inc [GeV]", "energy outside target"], rows)
    if metrics.get("notes"):
        doc.heading(3, "Notes")
        doc.items([str(n) for n in metrics["notes"]])

    floor = metrics.get("floor") or None
    ratios = metrics.get("ratio_to_floor") or {}
    if floor:
        doc.heading(2, "Floor")
        doc.paragraph("The floor is a second sample of the reference source, independent of the reference "
                      f"({(floor.get('input') or {}).get('path')}), evaluated against the reference exactly like "
                      "the generated sample: what a perfect simulator scores at these sample sizes. Every score "
                      "is shown for the model and for the floor; model / floor near 1 means the model is as "
                      "close to the reference as a fresh sample of it. The AUC (ideal 0.5) has no ratio. "
                      f"G / G_floor = {_number(ratios.get('geometric_mean'), 3)}.")

    # summary
    doc.heading(2, "Summary")
    model_rows = _headline(metrics)
    if floor:
        floor_rows = {label: text for label, text, _ in _headline(floor)}
        doc.table(["metric", "model", "floor", "model / floor"],
                  [[label, text, floor_rows.get(label, "n/a"), _number(_lookup(ratios, key), 3)]
                   for label, text, key in model_rows])
    else:
        doc.table(["metric", "value"], [[label, text] for label, text, _ in model_rows])
    classifier = metrics.get("classifier") or {}
    physics = metrics.get("fpd_kpd") or {}

    # CaloTransfer table
    table = metrics.get("calotransfer")
    if table:
        doc.heading(2, "CaloTransfer scores (normalised W1 = W1 / std of the reference)")
        descriptions = metrics.get("score_rows", {})
        scored = set(table.get("scored", []))
        floor_table = (floor or {}).get("calotransfer") or {}
        floor_scores = floor_table.get("scores") or {}
        extra = (lambda name: [_number((floor_scores.get(name) or {}).get("wasserstein")),
                               _number((ratios.get("wasserstein") or {}).get(name), 3)]) if floor \
            else (lambda name: [])
        rows = []
        for name, score in table["scores"].items():
            rows.append([name, _number(score.get("wasserstein")), _number(score.get("wasserstein_std"), 2),
                         *extra(name), _number(score.get("kl")), "yes" if name in scored else "",
                         descriptions.get(name, "")])
        rows.append(["geometric mean", _number(table.get("geometric_mean")),
                     _number(table.get("geometric_mean_std"), 2),
                     *([_number(floor_table.get("geometric_mean")), _number(ratios.get("geometric_mean"), 3)]
                       if floor else []), _number(table.get("kl_geometric_mean")),
                     "", f"{table.get('n_reference')} reference, {table.get('n_generated')} generated showers, "
                         f"{table.get('n_bootstrap')} bootstrap resamples"])
        doc.table(["observable", "W1 / std", "bootstrap std", *(["floor W1 / std", "model / floor"] if floor else []),
                   "KL [nats]", "in mean", "compares"], rows)

    cc = metrics.get("calochallenge") or {}
    sep_by_energy = cc.get("separation_power_summary_by_energy") or {}
    for kind, title, column, extra in (("energy", "By incident energy", "incident energy", sep_by_energy),
                                       ("theta", "By incidence angle", "polar angle", {})):
        tables = metrics.get(f"calotransfer_by_{kind}") or {}
        if not tables:
            continue
        doc.heading(2, title)
        extra_columns = ["sep E total", "sep E layer", "sep cell"] if extra else []
        rows = []
        for label, t in tables.items():
            row = [label, str(t.get("n_reference")), str(t.get("n_generated")),
                   _pm(t.get("geometric_mean"), t.get("geometric_mean_std")), _number(t.get("kl_geometric_mean"))]
            if floor:
                floor_t = ((floor.get(f"calotransfer_by_{kind}") or {}).get(label)) or {}
                row += [_pm(floor_t.get("geometric_mean"), floor_t.get("geometric_mean_std")),
                        _number((ratios.get(f"geometric_mean_by_{kind}") or {}).get(label), 3)]
            row += [_number((extra.get(label) or {}).get(c)) for c in extra_columns]
            rows.append(row)
        doc.table([column, "N reference", "N generated", "geometric mean W1", "geometric mean KL"]
                  + (["floor geometric mean W1", "model / floor"] if floor else []) + extra_columns, rows)

    # CaloChallenge
    if cc or any("auc" in (classifier.get(k) or {}) for k in ("low_level", "high_level")) or physics:
        doc.heading(2, "CaloChallenge metrics")
        sections = [("", metrics)] + ([(" (floor)", floor)] if floor else [])
        rows = []
        for key in ("low_level", "high_level"):
            for suffix, section in sections:
                record = (section.get("classifier") or {}).get(key) or {}
                name = key.replace("_", "-") + suffix
                if "auc" in record:
                    rows.append([name, _number(record["auc"]), _number(record["jsd"]),
                                 _number(record.get("accuracy")), str(record.get("n_per_class")),
                                 str(record.get("optimiser_steps_per_epoch", "n/a")),
                                 str(record.get("input_dimension")), str(record.get("best_epoch"))])
                else:
                    rows.append([name, "n/a", "n/a", "n/a", "", "", "", record.get("skipped", "")])
        doc.table(["classifier", "AUC", "JSD", "accuracy", "showers per class", "optimiser steps per epoch",
                   "inputs", "best epoch"], rows)
        if physics:
            rows = []
            for suffix, section in sections:
                values = section.get("fpd_kpd") or {}
                settings = values.get("settings", {})
                if values.get("skipped"):
                    rows.append([f"FPD, KPD{suffix}", "skipped", "see notes"])
                    continue
                rows.append([f"FPD{suffix}", _pm(values.get("fpd_x1e3"), values.get("fpd_error_x1e3"))
                             if "fpd_x1e3" in values else f"skipped: {values.get('fpd_skipped')}",
                             f"batch sizes {settings.get('min_samples')}-{settings.get('max_samples')}, "
                             f"official: {settings.get('official')}"])
                rows.append([f"KPD{suffix}", _pm(values.get("kpd_x1e3"), values.get("kpd_error_x1e3"))
                             if "kpd_x1e3" in values else f"skipped: {values.get('kpd_skipped')}",
                             f"batch size {settings.get('kpd_batch_size')}, official: {settings.get('official')}"])
            doc.table(["distance", "value x 10^3", "settings"], rows)
        if cc.get("separation_power_summary"):
            doc.heading(3, "Separation power (mean over layers for per-layer features)")
            floor_sep = ((floor or {}).get("calochallenge") or {}).get("separation_power_summary") or {}
            sep_ratio = ratios.get("separation_power_summary") or {}
            doc.table(["feature family", "separation power"] + (["floor", "model / floor"] if floor else []),
                      [[k, _number(v)] + ([_number(floor_sep.get(k)), _number(sep_ratio.get(k), 3)] if floor else [])
                       for k, v in cc["separation_power_summary"].items()])

    if plot_links:
        doc.heading(2, "Plots")
        ordered = [n for n in PLOT_CAPTIONS if n in plot_links] + sorted(n for n in plot_links
                                                                        if n not in PLOT_CAPTIONS)
        for name in ordered:
            caption = PLOT_CAPTIONS.get(name, name)
            doc.heading(3, caption)
            doc.image(caption, plot_links[name])

    timing = metrics.get("timing_s") or {}
    if timing:
        doc.heading(2, "Timing")
        doc.table(["stage", "seconds"], [[k, _number(v, 3)] for k, v in timing.items()])
    versions = metrics.get("versions") or {}
    if versions:
        doc.paragraph("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return doc


def write_report(metrics: Mapping, plot_paths: Mapping[str, str | os.PathLike[str]],
                 out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir`` (atomically) and return their paths.

    Args:
        metrics: the dict of :func:`~caloadapt.evaluate.pipeline.run_evaluation` (or read back from
            ``metrics.json``).
        plot_paths: plot name -> PNG path (absolute or relative to ``out_dir``); linked relatively.
        out_dir: output directory.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    links = {}
    for name, path in plot_paths.items():
        try:
            links[name] = Path(os.path.relpath(Path(path), out_dir)).as_posix()
        except ValueError:  # another drive (Windows): keep the path as given
            links[name] = Path(path).as_posix()
    doc = _build(metrics, links)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text(doc.markdown(), encoding="utf-8")
    with atomic_path(html_path) as tmp:
        tmp.write_text(doc.html("caloadapt evaluation"), encoding="utf-8")
    return md_path, html_path
