"""Before/after HTML reports of a verification and of an evaluation (self-contained: figures embedded as PNG)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from locedit.core.report import figure_data_uri, figure_html, page, table, write_atomic


def _v(x, spec=".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(float(x), spec)


def verification_report(d: dict) -> str:
    """The HTML of one verification (a `Verification.to_dict()`)."""
    from locedit.verification.plots import verification_figure

    b, before, m = d["behaviour"], d["behaviour"]["before"], d.get("mechanism")
    facts = "".join(f"<li><b>{html.escape(f['prompt'])}</b> {html.escape(repr(f['true_target']))} → "
                    f"<b>{html.escape(repr(f['new_target']))}</b></li>" for f in d["facts"])
    verdict = "PASSED" if d["passed"] else "FAILED"
    sections = [
        f"<p class=\"pred\">Model <code>{html.escape(str(d['model']))}</code>, method <b>{html.escape(d['method'])}"
        f"</b>, sites <code>{html.escape(json.dumps(d['sites']))}</code>. Verdict: <b>{verdict}</b> "
        f"({d['seconds']:.1f} s).</p><ul>{facts}</ul>",
        "<h2>Behaviour (before → after; before = the unedited model)</h2>",
        table([{"metric": name, "before": _v(before.get(key)), "after": _v(b.get(key))} for name, key in (
            ("Efficacy score ES", "efficacy_score"), ("Efficacy magnitude EM", "efficacy_magnitude"),
            ("Paraphrase score PS", "paraphrase_score"), ("Paraphrase magnitude PM", "paraphrase_magnitude"),
            ("Neighbourhood score NS", "neighborhood_score"), ("Neighbourhood magnitude NM", "neighborhood_magnitude"),
            ("Score S (harmonic mean of ES, PS, NS)", "score"),
            ("NS with the edit prompt prefixed (CounterFact+)", "neighborhood_score_prefixed"),
            ("Generation efficacy (greedy, contains new target)", "generation_efficacy"),
            ("Fluency GE (n-gram entropy, bits)", "fluency"), ("Perplexity of the text sample", "perplexity"))],
            ["metric", "before", "after"]),
        f"<p>Neighbourhood KL (CounterFact+, before ‖ after): <b>{_v(b.get('neighborhood_kl'), '.4f')}</b> nats; "
        f"perplexity drift {_v(100 * b['perplexity_drift'], '+.2f')}%. Behaviour "
        f"<b>{'passed' if b['passed'] else 'failed'}</b>: {html.escape(b['rule'])}.</p>",
        "<h2>Generations (greedy)</h2>",
    ]
    for fact in b["per_fact"][:3]:
        rows = [{"prompt": gb["prompt"], "before": gb["text"], "after": ga["text"]}
                for gb, ga in zip(fact["generations_before"], fact["generations_after"])]
        sections.append(table(rows, ["prompt", "before", "after"]))
    if m is not None:
        sections.append("<h2>Mechanism (old target before vs new target after)</h2>")
        rows = []
        for name in ("knockout", "extraction", "enrichment", "locality"):
            c = m[name]
            numbers = {k: v for k, v in c.items() if k not in ("evidence", "rule", "passed", "applicable")
                       and not isinstance(v, (dict, list))}
            rows.append({"check": name, "passed": "n/a" if c.get("passed") is None else
                         ("pass" if c["passed"] else "FAIL"),
                         "numbers": ", ".join(f"{k}={_v(v, '.3g') if isinstance(v, float) else v}"
                                              for k, v in numbers.items()),
                         "rule": c.get("rule", "")})
        sections.append(table(rows, ["check", "passed", "numbers", "rule"]))
        sections.append(f"<p>Mechanism <b>{'passed' if m['passed'] else 'failed'}</b> (every applicable check "
                        "must pass).</p>")
    sections += ["<h2>Figures</h2>", figure_html(figure_data_uri(verification_figure(d)),
                                                 "Before/after: probabilities, knockout, extraction heads, "
                                                 "enrichment")]
    f0 = d["facts"][0]
    return page(f"locedit verify: “{f0['prompt']}” {f0['true_target'].strip()} → {f0['new_target'].strip()}",
                sections)


def verify_and_report(lm, edit, out_dir, **verify_options):
    """Verify `edit` on `lm` (applied or not; left as it was), write `verification.json`, `figures/verification.png`
    and `.svg`, and a self-contained `report.html` into `out_dir`. Returns the Verification."""
    from locedit.core.plots import save_figure
    from locedit.verification.verify import verify

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ver = verify(lm, edit, **verify_options)
    d = ver.to_dict()
    write_atomic(out / "verification.json", json.dumps(d, indent=1))
    save_figure(ver.plot(), out / "figures" / "verification")
    write_atomic(out / "report.html", verification_report(d))
    return ver


def evaluation_report(agg: dict, model_name: str, method: str, figures: dict | None = None) -> str:
    """The HTML of an evaluation's aggregate (or of a sequential run's collapse curve)."""
    counts = agg.get("counts", {})
    sections = [f"<p class=\"pred\">Model <code>{html.escape(model_name)}</code>, method <b>{html.escape(method)}"
                f"</b>. {html.escape(', '.join(f'{k}: {v}' for k, v in counts.items()))}</p>"]
    if "overall" in agg:
        rows = [{"metric": k, "mean": s["mean"], "CI low": s["ci95"][0], "CI high": s["ci95"][1], "n": s["n"]}
                for k, s in agg["overall"].items()]
        sections += ["<h2>All facts (mean, bootstrap 95% CI)</h2>",
                     table(rows, ["metric", "mean", "CI low", "CI high", "n"])]
        from locedit.verification.evaluate import TABLE_COLUMNS

        rel = [{"relation": r, "n": s["n"], **{c: s.get(c, {}).get("mean") for c in TABLE_COLUMNS}}
               for r, s in agg.get("by_relation", {}).items()]
        sections += ["<h2>Per relation (means)</h2>", table(rel, ["relation", "n", *TABLE_COLUMNS])]
    if agg.get("sequential"):
        sections += ["<h2>Sequential editing</h2>",
                     table(agg["sequential"], ["edits", "edit_efficacy", "probe_accuracy", "probe_top1",
                                               "perplexity"])]
    for caption, fig in (figures or {}).items():
        sections.append(figure_html(figure_data_uri(fig), caption))
    return page("locedit evaluate", sections)
