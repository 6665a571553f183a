"""The data card: one self-contained HTML page per release that says what the dataset is, where it came
from, how it was made, how good and how private it is, and what the gate decided.

:func:`render_datacard` is a pure function from the stage summaries / reports and the two tables to an
HTML string. Plots are inline SVG drawn with matplotlib (vector only, text kept as text, no embedded
images), styles are inline, and the page loads nothing from the network.

What the card shows of the real data is aggregate only, and small cells are suppressed:

* distribution overlays use bins between the real 1st and 99th percentiles (values beyond fall into
  the edge bins, so single extreme values are not drawn) and drop real bins or categories with fewer
  than ``min_cell`` patients;
* relationship groups come from the quality report, which already leaves out groups under the
  relationship's ``min_group_rows``.

Never imports Airflow. matplotlib and jinja2 are imported lazily.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from synthfactory.quality import cardtext

__all__ = ["render_datacard", "plot_columns"]

MAX_PLOT_COLUMNS = 12
MIN_CELL = 5
N_BINS = 24
REAL_COLOUR = "#4C72B0"
SYNTH_COLOUR = "#DD8452"


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 4) -> str:
    """A figure for display: ``—`` for missing, booleans as yes/no, floats to ``digits`` significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            return "—"
        return f"{f:.{digits}g}"
    return str(value)


# --------------------------------------------------------------------------- plots


def _svg(fig: Any, salt: str) -> str:
    """A matplotlib figure as an inline <svg> element (no XML prolog; ids prefixed with ``salt`` so that
    several figures can share one page)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = re.sub(r"^.*?(<svg\b)", r"\1", text, count=1, flags=re.S)
    text = re.sub(r'\bid="([^"]+)"', lambda mo: f'id="{salt}-{mo.group(1)}"', text)
    return re.sub(r'(url\(#|href="#)([^")]+)', lambda mo: f"{mo.group(1)}{salt}-{mo.group(2)}", text)


def _figure(w: float, h: float) -> tuple[Any, Any]:
    """A pyplot-free figure (no global state, safe in worker threads)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=72)
    ax = fig.subplots()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _kind(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s.dtype):
        return "categorical"
    if pd.api.types.is_numeric_dtype(s.dtype):
        return "numeric" if s.nunique(dropna=True) > 12 else "discrete"
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return "numeric"
    return "categorical"


def _as_float(s: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        ts = s.dt.tz_convert(None) if getattr(s.dt, "tz", None) is not None else s
        return (ts - pd.Timestamp("1970-01-01")).dt.days.astype("float64")
    return pd.to_numeric(s, errors="coerce").astype("float64")


def _distribution_svg(col: str, real: pd.Series, synth: pd.Series, idx: int, min_cell: int) -> tuple[str, int]:
    """Overlay of the real and synthetic distribution of one column; returns (svg, suppressed cells)."""
    fig, ax = _figure(3.6, 2.5)
    kind = _kind(real)
    suppressed = 0
    if kind == "numeric":
        r, s = _as_float(real).dropna(), _as_float(synth).dropna()
        lo, hi = (float(r.quantile(0.01)), float(r.quantile(0.99))) if len(r) else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        if pd.api.types.is_integer_dtype(real.dtype) and hi - lo <= 4 * N_BINS:
            step = max(1, math.ceil((hi - lo + 1) / N_BINS))  # whole-number bins: no empty gaps
            edges = np.arange(lo - 0.5, hi + step + 0.5, step)
            hi = float(edges[-1])
        else:
            edges = np.linspace(lo, hi, N_BINS + 1)
        rc, _ = np.histogram(r.clip(lo, hi), bins=edges)
        sc, _ = np.histogram(s.clip(lo, hi), bins=edges)
        small = (rc > 0) & (rc < min_cell)
        suppressed = int(small.sum())
        rc = np.where(small, 0, rc)
        rp = rc / max(len(r), 1)
        sp = sc / max(len(s), 1)
        ax.stairs(rp, edges, fill=True, alpha=0.45, color=REAL_COLOUR, label="real")
        ax.stairs(sp, edges, color=SYNTH_COLOUR, linewidth=1.8, label="synthetic")
        ax.set_ylabel("share of rows")
    else:
        def labels(x: pd.Series) -> pd.Series:
            return x.map(lambda v: "(missing)" if pd.isna(v) else str(v))

        rv, sv = labels(real).value_counts(), labels(synth).value_counts()
        small = rv[rv < min_cell].index
        suppressed = int(len(small))
        rv = rv.drop(small)
        cats = list(rv.sort_values(ascending=False).index[:15])
        if kind == "discrete":
            cats = sorted(cats, key=lambda c: (float(c) if _is_number(c) else math.inf, c))
        rp = [rv.get(c, 0) / max(len(real), 1) for c in cats]
        sp = [sv.get(c, 0) / max(len(synth), 1) for c in cats]
        x = np.arange(len(cats))
        ax.bar(x - 0.2, rp, width=0.4, color=REAL_COLOUR, alpha=0.8, label="real")
        ax.bar(x + 0.2, sp, width=0.4, color=SYNTH_COLOUR, alpha=0.9, label="synthetic")
        tilt = sum(len(c) for c in cats) > 28
        ax.set_xticks(x, [c[:14] for c in cats], rotation=30 if tilt else 0, ha="right" if tilt else "center",
                      fontsize=8)
        ax.set_ylabel("share of rows")
    ax.set_title(col, fontsize=10)
    _legend(ax)
    return _svg(fig, f"dist{idx}"), suppressed


def _legend(ax: Any) -> None:
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)


def _is_number(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


def _heatmap_svg(corr: Mapping[str, Any]) -> str | None:
    cols = corr.get("columns") or []
    if len(cols) < 2 or not corr.get("real"):
        return None
    real = np.array([[np.nan if v is None else v for v in row] for row in corr["real"]], dtype=float)
    syn = np.array([[np.nan if v is None else v for v in row] for row in corr["synthetic"]], dtype=float)
    diff = syn - real
    n = len(cols)
    size = max(4.0, min(9.0, 0.32 * n + 2))
    fig, ax = _figure(size + 1.2, size)
    mesh = ax.pcolormesh(np.ma.masked_invalid(diff), cmap="RdBu_r", vmin=-1, vmax=1, edgecolors="white",
                         linewidth=0.3)
    ax.set_xticks(np.arange(n) + 0.5, cols, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n) + 0.5, cols, fontsize=7)
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_title("correlation: synthetic − real", fontsize=10)
    fig.colorbar(mesh, ax=ax, shrink=0.7)
    return _svg(fig, "corr")


def _bars_svg(title: str, labels: Sequence[str], real: Sequence[float | None], synth: Sequence[float | None],
              salt: str, real_label: str = "real", synth_label: str = "synthetic",
              ylabel: str = "") -> str:
    fig, ax = _figure(max(3.2, 0.9 * len(labels) + 1.6), 2.5)
    x = np.arange(len(labels))
    r = [np.nan if v is None else v for v in real]
    s = [np.nan if v is None else v for v in synth]
    ax.bar(x - 0.2, r, width=0.4, color=REAL_COLOUR, label=real_label)
    ax.bar(x + 0.2, s, width=0.4, color=SYNTH_COLOUR, label=synth_label)
    for xi, v in zip(x, r):
        if not np.isnan(v):
            ax.text(xi - 0.2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    for xi, v in zip(x, s):
        if not np.isnan(v):
            ax.text(xi + 0.2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [str(lab)[:18] for lab in labels], fontsize=8)
    ax.set_title(title, fontsize=10)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.margins(y=0.12)
    _legend(ax)
    return _svg(fig, salt)


def plot_columns(quality_report: Mapping[str, Any], real: pd.DataFrame, synthetic: pd.DataFrame,
                 limit: int = MAX_PLOT_COLUMNS) -> list[str]:
    """The "main" columns to plot: those in the relationships and the utility target first, then the
    worst-scoring columns, then the rest in table order; only columns in both tables."""
    order: list[str] = []
    for rel in quality_report.get("relationships") or []:
        order += [rel.get("measure"), rel.get("by")]
    util = quality_report.get("utility") or {}
    order.append(util.get("target"))
    cols = (quality_report.get("sdmetrics") or {}).get("columns") or []
    order += [c.get("column") for c in cols[:4]]
    order += list(real.columns)
    named = set(order[: 2 * len(quality_report.get("relationships") or []) + 1])
    out: list[str] = []
    for c in order:
        if c and c in real.columns and c in synthetic.columns and c not in out:
            if c in named or real[c].nunique(dropna=False) > 1:  # a constant column has nothing to show
                out.append(c)
    return out[:limit]


# --------------------------------------------------------------------------- page

_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>Data card · {{ dataset }} {{ version }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2933;background:#f7f8fa}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #d9dee4;padding-bottom:4px}
h3{font-size:1em;margin:16px 0 6px}
.badge{display:inline-block;padding:4px 12px;border-radius:14px;font-weight:700;color:#fff}
.ok{background:#2f855a}.bad{background:#c53030}.skip{background:#718096}
.pass{color:#2f855a;font-weight:600}.fail{color:#c53030;font-weight:700}.muted{color:#6b7785}
table{border-collapse:collapse;margin:6px 0 10px;background:#fff;font-size:.9em}
th,td{border:1px solid #d9dee4;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.card{background:#fff;border:1px solid #d9dee4;border-radius:8px;padding:10px 14px;min-width:150px}
.card .v{font-size:1.5em;font-weight:700}.card .k{font-size:.8em;color:#6b7785}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;background:#fff;border:1px solid #d9dee4;border-radius:6px;padding:4px}
svg{max-width:100%;height:auto}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.85em;word-break:break-all}
.reason{background:#fff5f5;border-left:4px solid #c53030;padding:6px 10px;margin:4px 0}
.warn{color:#b7791f;font-weight:700} td code{word-break:normal;white-space:nowrap}
</style></head>
<body><main>
<header>
<h1>Data card: {{ dataset }}</h1>
<div class="muted">version <b>{{ version }}</b> · run <code>{{ run_id }}</code> · generated {{ generated_at }}
 · threshold profile <b>{{ decision.profile or "default" }}</b></div>
<p id="decision"><span class="badge {{ 'ok' if decision.approved else 'bad' }}">{{ 'APPROVED for release' if decision.approved else 'REFUSED: quarantined, not released' }}</span>
 <span>{{ decision.message }}</span></p>
{% if description %}<p>{{ description }}</p>{% endif %}
<table id="about">
<tr><th>intended use</th><td>{{ about.intended_use or 'not stated in the spec' }}</td></tr>
<tr><th>owner</th><td>{{ about.owner or 'not stated' }}</td></tr>
<tr><th>contact</th><td>{{ about.contact or 'not stated in the spec' }}</td></tr>
<tr><th>licence</th><td>{{ about.licence or 'not stated in the spec: ask the contact before sharing' }}</td></tr>
</table>
<p class="muted">Synthetic data: every row was generated by a model; no row is a real patient. The figures below
compare it with the real training data, which stays in the secure staging area.</p>
</header>

<section id="summary"><h2>Dataset summary</h2>
<div class="cards">
{% for k, v in headline %}<div class="card"><div class="v">{{ v }}</div><div class="k">{{ k }}</div></div>{% endfor %}
</div>
<table>
<tr><th>synthetic rows</th><td class="num">{{ fmt(rows.synthetic) }}</td><th>real train rows</th><td class="num">{{ fmt(rows.real) }}</td>
<th>real holdout rows</th><td class="num">{{ fmt(rows.holdout) }}</td><th>columns</th><td class="num">{{ fmt(n_columns) }}</td></tr>
</table>
<h3>Synthesizer</h3>
<table><tr><th>kind</th><td>{{ synthesizer.kind }}</td></tr>
<tr><th>parameters</th><td><code>{{ synthesizer.params_json }}</code></td></tr>
{% for k, v in synthesizer.extra %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
</table>
</section>
{% if dp_budget %}

<section id="dp_budget"><h2>Privacy budget</h2>
<table>
<tr><th>this release</th><td>ε {{ fmt(dp_budget.epsilon) }}, δ {{ fmt(dp_budget.delta) }}</td></tr>
<tr><th>spent in {{ ("the last " ~ dp_budget.window_days ~ " days") if dp_budget.window_days else "all time" }} (this release included, {{ dp_budget.releases_in_window }} DP fit(s))</th>
<td>ε {{ fmt(dp_budget.spent_epsilon) }}, δ {{ fmt(dp_budget.spent_delta) }}</td></tr>
<tr><th>budget</th><td>ε {{ fmt(dp_budget.epsilon_cap) if dp_budget.epsilon_cap is not none else "no cap" }}, δ {{ fmt(dp_budget.delta_cap) if dp_budget.delta_cap is not none else "no cap" }}</td></tr>
<tr><th>remaining</th><td>ε {{ fmt(dp_budget.remaining_epsilon) if dp_budget.remaining_epsilon is not none else "—" }}, δ {{ fmt(dp_budget.remaining_delta) if dp_budget.remaining_delta is not none else "—" }}</td></tr>
</table>
<p class="muted">Every differentially private fit of this dataset is charged to one budget when the model is fitted on
real data, published or not; {{ dp_budget.composition }}.</p>
</section>
{% endif %}

<section id="gate"><h2>Gate decision</h2>
{% for r in decision.failed or [] %}<div class="reason">{{ r }}</div>{% endfor %}
<p class="muted">Each figure is judged against what real data itself achieves: real held-out rows scored against
real train rows the same way, over re-splits (mean ± standard deviation). A synthetic figure fails only when it is
worse than that reference by more than sampling noise allows.</p>
<table><tr><th>gate</th><th>check</th><th>figure</th><th>real data itself</th><th>rule</th><th>threshold</th><th>result</th></tr>
{% for c in decision.checks or [] %}<tr><td>{{ c.gate }}</td><td>{{ c.name }}</td><td class="num">{{ fmt(c.value) }}</td>
<td class="num">{% if c.reference and c.reference.mean is not none %}{{ fmt(c.reference.mean) }} ± {{ fmt(c.reference.sd) }}{% else %}—{% endif %}</td>
<td>{{ c.op }}</td><td class="num">{{ fmt(c.threshold) }}</td>
<td class="{{ result_class(c) }}">{{ result(c) }}</td></tr>{% endfor %}
</table>
{% if decision.not_certified %}<p class="muted">"not certified": the check passed on the lower end of a wide interval.
There is no significant evidence of that risk, but too few records to prove it small; see Privacy.</p>{% endif %}
{% if skipped %}<p class="muted">Not checked (too little real data to measure): {{ skipped | join('; ') }}</p>{% endif %}
</section>

<section id="quality"><h2>Quality</h2>
<table><tr><th>SDMetrics quality score</th><td class="num">{{ fmt(q.quality_score) }}</td>
<th>Column Shapes</th><td class="num">{{ fmt(fid.column_shapes) }}</td>
<th>Column Pair Trends</th><td class="num">{{ fmt(fid.column_pair_trends) }}</td></tr>
<tr><th>expectations passed</th><td class="num">{{ exp.successful }} / {{ exp.evaluated }} ({{ fmt(q.expectation_success_ratio) }})</td>
<th>worst column</th><td>{{ fid.worst_column or '—' }} ({{ fmt(fid.min_column_score) }})</td>
<th>suite</th><td>{{ q.suite_source or 'derived' }}</td></tr></table>
{% if expectation_rows %}<h3 id="failed-expectations">Failed expectations</h3>
<p class="muted">Expectations are derived from the real training data (ranges, quantiles, categories); a
synthetic table fails a few by chance, as real held-out rows do.</p>
<table><tr><th>expectation</th><th>column</th><th>observed in the synthetic data</th><th>expected</th></tr>
{% for f in expectation_rows %}<tr><td title="{{ f.expectation }}">{{ f.check }}</td><td><code>{{ f.column }}</code></td><td>{{ f.observed }}</td><td>{{ f.expected }}</td></tr>{% endfor %}
</table>{% endif %}

<h3 id="relationships">Clinical relationships</h3>
{% if relationships %}
{% for r in relationships %}
<table><tr><th colspan="7">{{ r.name }}: {{ r.stat }} of <code>{{ r.measure }}</code> by <code>{{ r.by }}</code>
 · tolerance {{ fmt(r.tolerance) }} beyond sampling noise · <span class="{{ 'pass' if r.status == 'passed' else ('muted' if r.status == 'skipped' else 'fail') }}">{{ r.status }}</span>
 {% if r.max_excess is defined and r.max_excess is not none %}(excess {{ fmt(r.max_excess) }}{% if r.worst_group %} in {{ r.worst_group }}{% endif %}; largest difference {{ fmt(r.max_error) }}){% endif %}
 {% if r.effect is defined and r.effect and r.effect.ratio is not none %}· effect kept {{ fmt(r.effect.ratio * 100, 3) }}% [{{ fmt(r.effect.ci_low * 100, 3) }}, {{ fmt(r.effect.ci_high * 100, 3) }}] of the real {{ r.effect.high_group }} − {{ r.effect.low_group }} difference {{ fmt(r.effect.real) }}{% if not r.effect.significant %} (the real difference is within noise: only the shape is checked){% endif %}{% endif %}</th></tr>
<tr><th>group</th><th>real</th><th>synthetic</th><th>difference</th><th>noise allowance (±{{ fmt(r.noise_z) }} SE)</th><th>real rows</th><th>synthetic rows</th></tr>
{% for g in r.groups %}<tr><td>{{ g.group }}</td><td class="num">{{ fmt(g.real) }}</td><td class="num">{{ fmt(g.synthetic) }}</td>
<td class="num">{{ fmt(g.diff) }}</td><td class="num">{{ fmt(g.noise_allowance) }}</td><td class="num">{{ fmt(g.real_rows) }}</td><td class="num">{{ fmt(g.synthetic_rows) }}</td></tr>{% endfor %}
{% if r.note %}<tr><td colspan="7" class="muted">{{ r.note }}</td></tr>{% endif %}
{% if r.suppressed_groups %}<tr><td colspan="7" class="muted">{{ r.suppressed_groups }} group(s) with fewer than {{ r.min_group_rows }} real rows not shown</td></tr>{% endif %}
</table>
{% endfor %}
<div class="grid">{% for s in relationship_svgs %}<figure>{{ s | safe }}</figure>{% endfor %}</div>
{% else %}<p class="muted">The spec names no relationships.</p>{% endif %}

<h3 id="utility">ML utility (train synthetic, test real)</h3>
{% if util %}
<table><tr><th>target</th><td><code>{{ util.target }}</code> ({{ util.task or '—' }}, {{ util.metric or '—' }})</td>
<th>status</th><td>{{ util.status }}</td></tr>
<tr><th>train real → test real (TRTR)</th><td class="num">{{ fmt(util.trtr) }}</td>
<th>train synthetic → test real (TSTR)</th><td class="num">{{ fmt(util.tstr) }}</td></tr>
<tr><th>ratio TSTR / TRTR</th><td class="num"><b>{{ fmt(util.ratio) }}</b></td><th>features</th><td>{{ util.features | length }}</td></tr>
{% if util.note %}<tr><td colspan="4" class="muted">{{ util.note }}</td></tr>{% endif %}</table>
{% if utility_svg %}<figure>{{ utility_svg | safe }}</figure>{% endif %}
{% else %}<p class="muted">No utility target in the spec.</p>{% endif %}

<h3>Per-column similarity</h3>
<table><tr><th>column</th><th>metric</th><th>score</th></tr>
{% for c in columns %}<tr><td>{{ c.column }}</td><td>{{ c.metric }}</td><td class="num">{{ fmt(c.score) }}</td></tr>{% endfor %}
</table>
</section>

<section id="privacy"><h2>Privacy</h2>
<p class="muted">Each figure with its 95 % interval where it has one, what fresh real rows score on it (mean ± sd over
re-splits), and the gate's result: pass, FAIL, "not certified" (passed without enough evidence to certify) or
"not gated" (reported only).</p>
<table id="privacy-figures"><tr><th>figure</th><th>value</th><th>95 % interval</th><th>real data itself</th><th>gate</th><th>meaning</th></tr>
{% for r in privacy_rows %}<tr><td><code>{{ r.name }}</code></td><td class="num">{{ fmt(r.value) }}</td>
<td class="num">{% if r.interval %}[{{ fmt(r.interval[0]) }}, {{ fmt(r.interval[1]) }}]{% else %}—{% endif %}</td>
<td class="num">{% if r.reference %}{{ fmt(r.reference.mean) }} ± {{ fmt(r.reference.sd) }}{% else %}—{% endif %}</td>
<td class="{{ status_class(r.status) }}">{{ r.status }}</td>
<td>{{ r.meaning }}{% if r.note %}<br><span class="muted">{{ r.note }}</span>{% endif %}</td></tr>{% endfor %}
</table>
{% if k_note %}<p id="k-anonymity-note" class="reason">{{ k_note }}</p>{% endif %}
</section>

<section id="plots"><h2>Distributions: real vs synthetic</h2>
<p class="muted">Shares of rows. Bins lie between the real 1st and 99th percentiles (values beyond fall in the edge bins);
real bins or categories with fewer than {{ min_cell }} patients are suppressed ({{ suppressed }} suppressed).</p>
<div class="grid">{% for s in dist_svgs %}<figure>{{ s | safe }}</figure>{% endfor %}</div>
{% if heatmap_svg %}<h3 id="correlation">Correlation difference</h3>
<p class="muted">Pearson correlation of numeric and yes/no columns, synthetic minus real (0 = kept). Largest absolute
difference {{ fmt(corr.max_abs_diff) }}, mean {{ fmt(corr.mean_abs_diff) }}.</p>
<figure>{{ heatmap_svg | safe }}</figure>{% endif %}
</section>

<section id="dictionary"><h2>Data dictionary</h2>
<p class="muted">Every released column of <code>data/patients.parquet</code>: one row per synthetic patient.</p>
<table><tr><th>column</th><th>type</th><th>meaning</th><th>codes</th><th>unit</th></tr>
{% for d in dictionary %}<tr><td><code>{{ d.column }}</code></td><td>{{ d.type }}</td><td>{{ d.meaning or '—' }}</td>
<td>{{ d.codes or '—' }}</td><td>{{ d.unit or '—' }}</td></tr>{% endfor %}
</table>
</section>

<section id="lineage"><h2>Lineage</h2>
<table>
<tr><th>source extract sha256</th><td class="mono">{{ lineage.extract_sha256 or 'not recorded' }}</td></tr>
<tr><th>dataset spec sha256</th><td class="mono">{{ lineage.spec_sha256 or 'not recorded' }}</td></tr>
{% for k, v in lineage.code_versions %}<tr><th>{{ k }}</th><td class="mono">{{ v or '—' }}</td></tr>{% endfor %}
{% for k, v in lineage.extra %}<tr><th>{{ k }}</th><td class="mono">{{ v }}</td></tr>{% endfor %}
</table>
<h3>Audited files (sha256 recorded by the gate)</h3>
<table><tr><th>file</th><th>sha256</th></tr>
{% for k, v in audited %}<tr><td>{{ k }}</td><td class="mono">{{ v }}</td></tr>{% endfor %}
<tr><td>reports/datacard.html</td><td class="muted">this page; its sha256 is in the gate decision and the release manifest</td></tr>
</table>
</section>
<footer class="muted"><p>synthfactory data card · self-contained: no scripts, no network resources.</p></footer>
</main></body></html>
"""


def _plots(quality_report: Mapping[str, Any], real: pd.DataFrame, synthetic: pd.DataFrame, rels: list, util: Any,
           corr: Mapping[str, Any], min_cell: int, max_plot_columns: int) -> tuple:
    dist_svgs, suppressed = [], 0
    for i, col in enumerate(plot_columns(quality_report, real, synthetic, max_plot_columns)):
        svg, n = _distribution_svg(col, real[col], synthetic[col], i, min_cell)
        dist_svgs.append(svg)
        suppressed += n
    rel_svgs = []
    for i, r in enumerate(rels):
        groups = list(r.get("groups") or [])
        if groups:
            rel_svgs.append(_bars_svg(f"{r['name']}: {r.get('stat')} {r.get('measure')} by {r.get('by')}",
                                      [g["group"] for g in groups], [g["real"] for g in groups],
                                      [g["synthetic"] for g in groups], salt=f"rel{i}"))
    utility_svg = None
    if util and util.get("trtr") is not None:
        utility_svg = _bars_svg(f"{util.get('metric')} on the real holdout", [str(util.get("target"))],
                                [util.get("trtr")], [util.get("tstr")], salt="util",
                                real_label="trained on real", synth_label="trained on synthetic")
    return dist_svgs, suppressed, _heatmap_svg(corr), rel_svgs, utility_svg


def _result(check: Mapping[str, Any]) -> str:
    if not check.get("passed"):
        return "FAIL"
    return check.get("result") or ("not certified" if check.get("certified") is False else "pass")


def _status_class(status: str) -> str:
    return {"pass": "pass", "FAIL": "fail", "not certified": "warn"}.get(status, "muted")


def _result_class(check: Mapping[str, Any]) -> str:
    return _status_class(_result(check))


def render_datacard(
    *,
    dataset: str,
    version: str,
    run_id: str,
    decision: Mapping[str, Any],
    quality_report: Mapping[str, Any],
    quality_summary: Mapping[str, Any] | None = None,
    privacy_summary: Mapping[str, Any] | None = None,
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    synthesizer: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any] | None = None,
    rows: Mapping[str, Any] | None = None,
    description: str = "",
    generated_at: str | None = None,
    min_cell: int = MIN_CELL,
    max_plot_columns: int = MAX_PLOT_COLUMNS,
    plot_cache: dict | None = None,
    about: Mapping[str, Any] | None = None,
    dictionary: Mapping[str, Any] | None = None,
    privacy_thresholds: Mapping[str, Any] | None = None,
    privacy_notes: Mapping[str, Any] | None = None,
) -> str:
    """Render the data card HTML.

    ``decision`` is the gate's decision record (``approved``, ``message``, ``failed``, ``checks``,
    ``audited_files``, ``profile``); ``quality_report`` the quality stage's ``reports/quality.json``;
    ``quality_summary`` / ``privacy_summary`` the stage summaries (figures); ``real`` the real train table
    and ``synthetic`` the synthetic table, both without key columns; ``synthesizer`` ``{"kind", "params",
    ...}``; ``lineage`` ``{"extract_sha256", "spec_sha256", "code_versions": {...}, ...}``; ``rows``
    ``{"synthetic", "real", "holdout"}``. ``plot_cache``: a dict the plots are kept in, so that rendering
    the card again for the same data (e.g. with an updated decision) does not redraw them.
    ``about``: ``{"intended_use", "owner", "contact", "licence"}`` from the spec; ``dictionary``: the prepare
    stage's column descriptions (``model/columns.json``); ``privacy_thresholds``: the privacy thresholds used
    (for the k-anonymity note); ``privacy_notes``: the privacy report's ``gate_rules.anonymeter``.
    """
    from jinja2 import Environment

    qs = dict(quality_summary or {})
    q = {**qs, **{k: quality_report.get(k) for k in ("quality_score", "expectation_success_ratio", "suite_source")
                  if quality_report.get(k) is not None}}
    fid = dict(quality_report.get("fidelity") or {})
    exp = dict(quality_report.get("expectations") or {"evaluated": 0, "successful": 0, "failed": []})
    rels = list(quality_report.get("relationships") or [])
    util = quality_report.get("utility")
    sdm = quality_report.get("sdmetrics") or {}

    corr = fid.get("correlation") or {}
    cache = plot_cache if plot_cache is not None else {}
    if "plots" not in cache:
        cache["plots"] = _plots(quality_report, real, synthetic, rels, util, corr, min_cell, max_plot_columns)
    dist_svgs, suppressed, heatmap, rel_svgs, utility_svg = cache["plots"]

    headline = [("decision", "approved" if decision.get("approved") else "refused"),
                ("quality score", fmt(q.get("quality_score"), 3)),
                ("expectations passed", fmt(q.get("expectation_success_ratio"), 3)),
                ("worst column score", fmt(fid.get("min_column_score"), 3))]
    if util and util.get("ratio") is not None:
        headline.append(("utility ratio (TSTR/TRTR)", fmt(util.get("ratio"), 3)))
    ps = dict(privacy_summary or {})
    for key, label in (("exact_match_rate", "exact match rate"), ("dcr_share", "DCR share (0.5 ideal)")):
        if key in ps:
            headline.append((label, fmt(ps[key], 3)))
    if "leak_clean" in ps:
        headline.append(("leak scan", "clean" if ps["leak_clean"] else "HITS"))

    skipped = [f"relationship {r['name']}: {r.get('note')}" for r in rels if r.get("status") == "skipped"]
    if util and util.get("status") == "skipped":
        skipped.append(f"utility {util.get('target')}: {util.get('note')}")

    syn = dict(synthesizer or {})
    lin = dict(lineage or {})
    rows = dict(rows or {})
    ctx = {
        "dataset": dataset, "version": version, "run_id": run_id, "description": description,
        "generated_at": generated_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "decision": dict(decision), "headline": headline, "skipped": skipped,
        "rows": {"synthetic": rows.get("synthetic", len(synthetic)), "real": rows.get("real", len(real)),
                 "holdout": rows.get("holdout")},
        "n_columns": synthetic.shape[1],
        "synthesizer": {"kind": syn.get("kind", "—"),
                        "params_json": json.dumps(syn.get("params") or {}, sort_keys=True, default=str),
                        "extra": [(k, fmt(v)) for k, v in syn.items() if k not in {"kind", "params", "dp_budget"}]},
        "dp_budget": syn.get("dp_budget"),
        "q": q, "fid": fid, "exp": exp, "relationships": rels, "util": util, "columns": sdm.get("columns") or [],
        "privacy_rows": cardtext.privacy_rows(ps, decision.get("checks") or [], privacy_notes),
        "k_note": cardtext.k_anonymity_note(ps, privacy_thresholds, decision.get("checks") or [],
                                            decision.get("approved")),
        "expectation_rows": cardtext.expectation_rows(exp.get("failed") or []),
        "dictionary": cardtext.data_dictionary(synthetic, dictionary),
        "about": {"intended_use": "", "owner": "", "contact": "", "licence": "", **dict(about or {})},
        "result": _result, "result_class": _result_class, "status_class": _status_class,
        "corr": corr,
        "dist_svgs": dist_svgs, "heatmap_svg": heatmap, "relationship_svgs": rel_svgs, "utility_svg": utility_svg,
        "suppressed": suppressed, "min_cell": min_cell,
        "lineage": {"extract_sha256": lin.get("extract_sha256"), "spec_sha256": lin.get("spec_sha256"),
                    "code_versions": sorted((lin.get("code_versions") or {}).items()),
                    "extra": [(k, v) for k, v in lin.items()
                              if k not in {"extract_sha256", "spec_sha256", "code_versions"}]},
        "audited": sorted((decision.get("audited_files") or {}).items()),
        "fmt": fmt,
    }
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    html = env.from_string(_TEMPLATE).render(**ctx)
    tables = quality_report.get("tables")
    if tables:  # relational mode: one short section per table, before the lineage
        section = env.from_string(_TABLES_SECTION).render(rows=_table_rows(tables), fmt=fmt)
        html = html.replace('<section id="lineage">', section + '<section id="lineage">', 1)
    return html


_TABLES_SECTION = """<section id="tables"><h2>Tables (relational mode)</h2>
<p>Each table of the synthetic record beside its real-data reference (real held-out vs real train patients).
Gate: quality at least 0.95 of the reference, children-per-patient KS at most the reference's + 0.05, the
table's GX checks (keys, references, date order, codes) passed; event timing (days between a patient's
consecutive events, age at the first event, rows inside their encounter), condition co-occurrence and the
spec-named lab trajectory each within its reference + a margin (the rule is on each row).</p>
{% for r in rows %}<h3>{{ r.name }}</h3>
<table><tr><th>figure</th><th>synthetic</th><th>real reference</th><th>threshold</th><th>result</th><th>rule</th></tr>
{% for c in r.checks %}<tr><td>{{ c.figure }}</td><td>{{ fmt(c.value, 3) }}</td><td>{{ fmt(c.reference, 3) }}</td>
<td>{{ c.op }} {{ fmt(c.threshold, 3) }}</td><td>{{ "pass" if c.passed else "FAIL" }}</td><td>{{ c.rule or "" }}</td></tr>
{% endfor %}{% for k, v in r.extra %}<tr><td>{{ k }}</td><td>{{ fmt(v[0], 3) }}</td><td>{{ fmt(v[1], 3) }}</td>
<td></td><td></td><td></td></tr>{% endfor %}</table>
{% if r.trajectory %}<p>Lab trajectory ({{ r.trajectory_stat }} value per period since the patient's first value; cells
with enough real values): synthetic / real train / real held-out (the reference).</p>
<table><tr><th>condition group / period</th><th>synthetic</th><th>real</th><th>real held-out</th></tr>
{% for cell, v in r.trajectory %}<tr><td>{{ cell }}</td><td>{{ fmt(v[0], 3) }}</td><td>{{ fmt(v[1], 3) }}</td>
<td>{{ fmt(v[2], 3) }}</td></tr>{% endfor %}</table>{% endif %}
{% endfor %}</section>
"""


def _table_rows(tables: Mapping[str, Any]) -> list[dict]:
    gate = (tables.get("gate") or {}).get("tables") or {}
    figs = (tables.get("figures") or {}).get("tables") or {}
    refs = (tables.get("reference") or {}).get("tables") or {}
    rows = []
    for name, g in gate.items():
        extra = []
        gated = {c.get("figure") for c in g.get("checks") or []}
        for k in ("column_shapes", "column_pair_trends", "value_ks_median", "value_ks_worst", "interval_ks",
                  "first_age_ks", "in_encounter", "per_encounter_ks", "cooccurrence_mad", "cooccurrence_error", "trajectory"):
            if k in gated:
                continue
            v, r = (figs.get(name, {}).get(k) or {}).get("mean"), (refs.get(name, {}).get(k) or {}).get("mean")
            if v is not None or r is not None:
                extra.append((k, (v, r)))
        f, rf = figs.get(name, {}), refs.get(name, {})
        real_cells = f.get("trajectory_real") or {}
        trajectory = [(cell, ((f.get("trajectory_other") or {}).get(cell) or {}).get("mean"), v.get("mean"),
                       ((rf.get("trajectory_other") or {}).get(cell) or {}).get("mean"))
                      for cell, v in real_cells.items() if v]
        rows.append({"name": name, "checks": g.get("checks") or [], "extra": extra,
                     "trajectory": [(c, (a, b, d)) for c, a, b, d in trajectory],
                     "trajectory_stat": (tables.get("trajectory") or {}).get("stat", "median")})
    return rows
