"""Reading a run's global explanation (``RUNDIR/explanation.json``) for its reports.

The coordinator writes the file (format ``genofed-explanation``, version 1) from the sites' clipped,
noised attribution sums. ``metrics.md`` and ``report.html`` read it through here only, so that a
broken file, or one of another format, gives one reason in words instead of a crash. Nothing here
draws (no matplotlib): :mod:`server.report` imports it at the top, and the figures live in
:mod:`server.report_explanation`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

EXPLANATION = "explanation.json"
FORMAT, VERSION = "genofed-explanation", 1
MOTIFS_PER_OUTPUT = 3
TOP_FEATURES_MD = 10


def read_explanation(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The run's explanation, or why it could not be read.

    Parameters
    ----------
    run_dir : the run folder.

    Returns
    -------
    ``(doc, "")`` when the file reads; ``(None, reason)`` when it is broken or of another format or
    version; ``(None, "")`` when the run has no explanation.
    """
    path = run_dir / EXPLANATION
    if not path.is_file():
        return None, ""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(doc, dict):
        return None, f"a JSON {type(doc).__name__}, expected an object of format {FORMAT!r}"
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        return None, (f"format {doc.get('format')!r} version {doc.get('version')!r}, expected {FORMAT!r} "
                      f"version {VERSION}")
    return doc, ""


def features_by_output(entries: list[dict[str, Any]], top: int) -> dict[str, list[dict[str, Any]]]:
    """The ``top`` most important features of each explained output, most important first.

    Sorted here by ``importance`` rather than trusting ``rank``: the report shows what the
    released numbers say. Entries without a finite importance cannot be drawn and are left out.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries or []:
        if math.isfinite(float(e["importance"])):
            groups.setdefault(str(e.get("output", "")), []).append(e)
    return {out: sorted(es, key=lambda e: -float(e["importance"]))[:top] for out, es in groups.items()}


def motifs_by_output(motifs: list[dict[str, Any]], per_output: int = MOTIFS_PER_OUTPUT
                     ) -> dict[str, list[dict[str, Any]]]:
    """At most ``per_output`` motifs per output, in the file's order (strongest first per output)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in motifs or []:
        kept = groups.setdefault(str(m.get("output", "")), [])
        if len(kept) < per_output:
            kept.append(m)
    return groups


def sign_word(mean: Any) -> str:
    """'+' when a feature raises the output's risk on average, '-' when it lowers it, '0' when neither."""
    m = float(mean or 0.0)
    return "+" if m > 0 else "-" if m < 0 else "0"


def positions_text(motif: dict[str, Any]) -> str:
    """A motif's positions as "40-79" (the file's numbers as they are)."""
    return "-".join(str(p) for p in motif.get("positions") or [])


# What a well-formed JSON file of the right format can still get wrong (a missing key, a string for a number).
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def unreadable_reason(exc: Exception) -> str:
    """An exception from reading an explanation's contents, in one line."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def explanation_markdown(expl: dict[str, Any] | None, error: str = "") -> list[str]:
    """The "Explanation" part of ``metrics.md``: top features with their sign, top motifs, shares.

    Parameters
    ----------
    expl : the explanation (:func:`read_explanation`), or None when there is none.
    error : why the explanation could not be read ("" when it could).
    """
    if not error and expl:
        try:
            return _markdown_lines(expl)
        except MALFORMED as exc:
            error = unreadable_reason(exc)
    return ["", f"Explanation: explanation.json could not be read ({error})."] if error else []


def _markdown_lines(expl: dict[str, Any]) -> list[str]:
    how = (f"noised sums (epsilon {expl.get('epsilon', '?')} per site)" if expl.get("noised", True) else
           "sums, exact (the run had no DP: outside any guarantee)")
    lines = ["", f"Explanation (global, from {expl.get('patients', '?')} patients; per-patient explanations never "
             f"left the sites, which released only {how}):", ""]
    for out, es in features_by_output(expl.get("features") or [], TOP_FEATURES_MD).items():
        lines.append(f"- Top features for {out} (the hybrid's consensus of the forest's TreeSHAP and the GLMs' "
                     "attributions, mean share per patient; + raises, - lowers the risk): " + ", ".join(f"{e['feature']} {sign_word(e.get('mean'))} {float(e['importance']):.3g}"
                                           for e in es))
    for out, ms in motifs_by_output(expl.get("motifs") or []).items():
        lines.append(f"- Top motifs for {out} (deep model): " + ", ".join(
            f"{m['kmer']} (score {float(m['score']):.3g}, positions {positions_text(m)})" for m in ms))
    if expl.get("shares"):
        lines.append("- Meta-classifier's share of evidence: "
                     + ", ".join(f"{k} {float(v):.0%}" for k, v in expl["shares"].items()))
    return lines
