"""Before/after HTML reports of a verification and of an evaluation (self-contained: figures embedded as PNG).

A verification report opens with its verdict and what it means, describes the edited sites in words, and shows each
check's numbers as a small table (never a raw dump of the result's JSON)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from locedit.core.head import Head
from locedit.core.report import figure_data_uri, figure_html, page, table
from locedit.core.results import write_atomic
from locedit.verification.ripple import ripple_html

CHECKS = ("knockout", "extraction", "sufficiency", "necessity", "ov_read", "enrichment", "locality")

# What each outcome means, one sentence each.
VERDICT_MEANING = {
    True: "The edit passed: the model now gives the new target where it should and keeps its other answers, and "
          "every applicable mechanistic check finds the new fact retrieved the way the old one was.",
    False: "The edit failed: at least one check below did not pass, so the edit is either incomplete or does not "
           "act through the mechanism that retrieved the old fact.",
}
BEHAVIOUR_MEANING = {
    True: "Behaviour passed: the prompt's answer (ES = 1) and its greedy generation are the new target, paraphrases "
          "follow (PS ≥ 0.5) and neighbouring facts keep their answers (NS fell by at most 0.1).",
    False: "Behaviour failed: {failed}.",
}
CHECK_MEANING = {
    "knockout": {
        True: "Knockout passed: blocking the last position's attention to the subject removes the new target, near "
              "the layers where it removed the old one, so the new attribute travels the old route.",
        False: "Knockout failed: the new target does not depend on the subject → last attention flow the way the "
               "old one did (too weak a drop, another critical layer, or a different curve)."},
    "extraction": {
        True: "Extraction passed: the heads that extracted the old target now write the new one, more strongly than "
              "the old.",
        False: "Extraction failed: the extraction heads do not write the new target above the old one, so the answer "
               "reaches the output some other way."},
    "sufficiency": {
        True: "Sufficiency passed: the edited subject state alone, patched into the unedited model, raises the new "
              "target, so the subject's representation carries it.",
        False: "Sufficiency failed: the edited subject state alone, patched into the unedited model, does not raise "
               "the new target: the edit acts somewhere other than the subject's representation."},
    "necessity": {
        True: "Necessity passed: restoring the unedited subject state in the edited model removes the new target, "
              "so the edit works through the subject's representation.",
        False: "Necessity failed: with the unedited subject state restored the edited model still gives the new "
               "target, so the edit reaches the output another way."},
    "ov_read": {
        True: "OV read passed: the extraction heads, reading only the edited subject state, now write the new "
              "target more than before.",
        False: "OV read failed: the extraction heads reading the edited subject state do not write the new target "
               "more than before."},
    "enrichment": {
        True: "Logit lens: the edited subject state points at the new target under the logit lens.",
        False: "Logit lens: the edited subject state does not come near the new target under the logit lens."},
    "locality": {
        True: "Locality passed: neighbouring facts keep their answer's probability (within 25%) and their top MLP "
              "layer and head.",
        False: "Locality failed: a neighbouring fact's probability moved by more than 25% or its top MLP layer or "
               "head changed."},
}
METHOD_WORDS = {"rome": "ROME", "memit": "MEMIT", "ft": "FT-L fine-tuning", "head": "Head"}
LAYER_SOURCE_WORDS = {"located": "the layer `locate` ranked top for this fact",
                      "calibrated": "the calibrated edit layer of these weights (locedit calibrate)",
                      "measured": "this model's measured edit layer"}  # edits saved before calibrations existed
KEY_WORDS = {"subject_last": "the subject's last token", "carrier": "the subject token that carries the fact, by "
                                                                    "locate's causal trace",
             "last": "the prompt's last token, a control that bypasses the subject"}
BEHAVIOUR_ROWS = (
    ("Efficacy score ES", "efficacy_score"), ("Efficacy magnitude EM", "efficacy_magnitude"),
    ("Paraphrase score PS", "paraphrase_score"), ("Paraphrase magnitude PM", "paraphrase_magnitude"),
    ("Neighbourhood score NS", "neighborhood_score"), ("Neighbourhood magnitude NM", "neighborhood_magnitude"),
    ("Score S (harmonic mean of ES, PS, NS)", "score"),
    ("NS with the edit prompt prefixed (CounterFact+)", "neighborhood_score_prefixed"),
    ("Generation efficacy (greedy, contains new target)", "generation_efficacy"),
    ("Fluency GE (n-gram entropy, bits)", "fluency"), ("Perplexity of the text sample", "perplexity"))
# Readable names of a check's numbers; `_before`/`_after` pairs share one row.
LABELS = {
    "critical_layer": "critical layer (largest drop)", "critical_centre": "critical layer (drop-weighted centre)",
    "subject_drop": "drop of p when last ← subject is blocked (%)",
    "subject_logodds_drop": "drop of the log-odds when last ← subject is blocked",
    "p": "p(target)", "layer_shift": "shift of the drop-weighted centre (layers)",
    "curve_correlation": "Pearson r of the subject curves", "curve_correlation_all_groups": "Pearson r, all groups",
    "heads": "heads read", "head_source": "heads chosen by", "sum_old": "Σ direct logit of the old target",
    "sum_new": "Σ direct logit of the new target", "new_minus_old": "Σ new − Σ old",
    "new_gain": "rise of Σ new", "layer": "edited layer read", "position": "position read", "token": "token read",
    "layers_read": "layers read", "new_rank_at_layer": "rank of new target at the edited layer",
    "new_best_rank": "best rank of new target", "old_median_rank": "median rank of old target",
    "neighbours": "neighbours measured", "same_sites": "neighbours keeping their top MLP layer and head",
    "max_abs_relative_change": "largest |relative change| of a neighbour's p(true)", "reason": "why not applicable",
}
VALUE_WORDS = {"direct_logit_before": "largest direct logit to the old target before the edit",
               "sitemap": "locate's extraction heads"}
HIDDEN = {"evidence", "rule", "passed", "applicable", "events", "per_fact"}


def _v(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(float(x), spec)


def _num(x: Any) -> str:
    """A check's number in a table cell: ints as they are, floats to 3 significant digits, heads as L<l>H<h>."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return format(x, ".3g")
    if isinstance(x, (list, tuple)):
        if x and all(isinstance(h, (list, tuple)) and len(h) == 2 for h in x):
            return ", ".join(str(Head.parse(list(h))) for h in x)
        return ", ".join(_num(v) for v in x)
    if isinstance(x, str):
        return VALUE_WORDS.get(x, repr(x) if x != x.strip() else x)
    return str(x)


def _layers_words(layers: Sequence[int]) -> str:
    layers = [int(l) for l in layers]
    if len(layers) == 1:
        return f"layer {layers[0]}'s"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}–{layers[-1]}'s"
    return "layers " + ", ".join(map(str, layers)) + "'"


def sites_in_words(method: str, sites: Mapping, key_token: str | None = None) -> str:
    """One sentence for an edit's sites, e.g. "ROME edit of layer 1's MLP, keyed at ' Tower' (the subject's last
    token)"; `key_token` is the token at the key position when known."""
    name = METHOD_WORDS.get(method, method)
    if method == "external":
        layers = sites.get("layers") or []
        where = f"{_layers_words(layers)} MLP{'s' if len(layers) > 1 else ''}" if layers else "no MLP output projection"
        return (f"An edit made outside locedit (base and edited model compared): the weight diff finds changes at "
                f"{where}; the mechanistic checks read the subject's last token")
    if method == "head":
        heads = ", ".join(str(Head.parse(list(h))) for h in sites.get("heads") or [])
        text = f"{name} edit of {heads or 'no heads'} (their attention parameters)"
        return text + (", the extraction heads `locate` found" if sites.get("located") else "")
    layers = sites.get("layers") or []
    what = "MLPs" if len(layers) > 1 else "MLP"
    text = f"{name} edit of {_layers_words(layers)} {what}" if layers else f"{name} edit"
    rule = sites.get("key_position")
    if method != "ft" and rule in KEY_WORDS:
        where = f"{key_token!r} ({KEY_WORDS[rule]})" if key_token is not None else KEY_WORDS[rule]
        text += f", keyed at {where}"
    source = sites.get("layer_source")
    if source in LAYER_SOURCE_WORDS:
        text += f"; the layer is {LAYER_SOURCE_WORDS[source]}"
    elif layers and not sites.get("located"):
        text += "; the layers were given"
    return text


def _behaviour_failures(b: Mapping) -> list[str]:
    before = b.get("before", {})
    failed = []
    if b.get("efficacy_score") != 1.0:
        failed.append(f"the prompt does not prefer the new target every time (ES = {_v(b.get('efficacy_score'), '.2f')})")
    if not b.get("generation_efficacy_prompt"):
        failed.append("the prompt's greedy generation does not contain the new target")
    if b.get("paraphrase_score") is not None and b["paraphrase_score"] < 0.5:
        failed.append(f"fewer than half the paraphrases follow (PS = {_v(b['paraphrase_score'], '.2f')})")
    ns, ns0 = b.get("neighborhood_score"), before.get("neighborhood_score")
    if ns is not None and ns0 is not None and ns < ns0 - 0.1:
        failed.append(f"neighbouring facts lost their answers (NS {_v(ns0, '.2f')} → {_v(ns, '.2f')})")
    return failed or [b.get("rule", "see the table")]


def _check_sentence(name: str, check: Mapping) -> str:
    if check.get("passed") is None or check.get("applicable") is False:
        return f"{name.capitalize()} not applicable: {check.get('reason', 'no numbers for this edit')}."
    text = CHECK_MEANING[name][bool(check["passed"])]
    if check.get("in_rule") is False:
        text += " (Evidence only: this check failed validation on control edits and is not in the verdict.)"
    return text


def _outcome(passed: bool | None) -> str:
    if passed is None:
        return "<span class=\"na\">n/a</span>"
    return "<span class=\"pass\">PASSED</span>" if passed else "<span class=\"fail\">FAILED</span>"


def verdict_html(d: Mapping) -> str:
    """The opening block: the verdict, what it means, and one sentence per part (behaviour, each check)."""
    b, m = d["behaviour"], d.get("mechanism")
    items = [(b["passed"], BEHAVIOUR_MEANING[True] if b["passed"] else
              BEHAVIOUR_MEANING[False].format(failed="; ".join(_behaviour_failures(b))))]
    if m is not None:
        items += [(m[n].get("passed") if m[n].get("applicable", True) else None, _check_sentence(n, m[n]))
                  for n in CHECKS if n in m]
    else:
        items.append((None, "Mechanism not checked (verify ran with mechanism=False)."))
    lines = "".join(f"<li>{_outcome(p)} {html.escape(s)}</li>" for p, s in items)
    return (f"<div class=\"verdict {'ok' if d['passed'] else 'bad'}\" id=\"verdict\"><p class=\"big\">Verdict: "
            f"{_outcome(d['passed'])}</p><p>{html.escape(VERDICT_MEANING[bool(d['passed'])])}</p>"
            f"<ul>{lines}</ul></div>")


def verdict_scores_html(v: Mapping | None) -> list[str]:
    """The verdict's criteria with their scores: behaviour (NS+ and NKL reported outside the rule), then each
    mechanistic check's continuous score beside its pass."""
    if v is None:
        return []
    b = v["behaviour"]
    rows = [{"criterion": c["name"], "score": c["score"], "rule": c["rule"],
             "outcome": "not in the rule" if not c["in_rule"] else ("pass" if c["passed"] else "FAIL")}
            for c in b["checks"] + b["reported"]]
    out = ["<h2>Verdict, with scores</h2>", "<h3>Behaviour</h3>",
           table(rows, ["criterion", "score", "outcome", "rule"])]
    m = v.get("mechanism")
    if m is not None:
        rows = [{"check": name, "score": c["score"], "score is": c["score_meaning"],
                 "outcome": "n/a" if not c["applicable"] else ("pass" if c["passed"] else "FAIL")
                 + ("" if c.get("in_rule", True) else " (evidence, not in the rule)")}
                for name, c in m["checks"].items()]
        out += ["<h3>Mechanism</h3>", table(rows, ["check", "score", "score is", "outcome"])]
    out.append(f"<p>Exit status of <code>locedit verify</code>: <b>{v['exit_status']}</b> (0 passed, 1 failed, "
               "2 user error).</p>")
    return out


def weight_diff_html(diff: Sequence | None) -> list[str]:
    """Where the edited model differs from its base: each tensor, its place in words and the rank of the change."""
    if diff is None:
        return []
    if not diff:
        return ["<h3>Where was it edited</h3>", "<p>The two models are identical.</p>"]
    rows = [{"where": r["where"], "tensor": r["name"], "shape": "×".join(map(str, r["shape"])), "rank": r["rank"],
             "|ΔW| / |W|": r["relative_norm"]} for r in sorted(diff, key=lambda r: -r["relative_norm"])]
    return ["<h3>Where was it edited</h3>", table(rows, ["where", "tensor", "shape", "rank", "|ΔW| / |W|"])]


def check_table(check: Mapping) -> str:
    """A check's numbers as one small table: quantity | before the edit | after the edit (a single value spans
    both columns)."""
    keys = [k for k, v in check.items() if k not in HIDDEN and not isinstance(v, dict)]
    rows: list[tuple] = []
    for k in keys:
        base = k.removesuffix("_before")
        if k.endswith("_before") and base + "_after" in check:
            rows.append((LABELS.get(base, base.replace("_", " ")), check[k], check[base + "_after"]))
        elif not (k.endswith("_after") and k.removesuffix("_after") + "_before" in check):
            rows.append((LABELS.get(k, k.replace("_", " ")), check[k]))
    body = "".join(f"<tr><td>{html.escape(r[0])}</td><td>{html.escape(_num(r[1]))}</td>"
                   f"<td>{html.escape(_num(r[2]))}</td></tr>" if len(r) == 3 else
                   f"<tr><td>{html.escape(r[0])}</td><td colspan=\"2\">{html.escape(_num(r[1]))}</td></tr>"
                   for r in rows)
    return ("<table class=\"check\"><thead><tr><th>quantity</th><th>before the edit</th><th>after the edit</th>"
            f"</tr></thead><tbody>{body}</tbody></table>")


def _neighbour_table(check: Mapping) -> str:
    per = (check.get("evidence") or {}).get("per_neighbour") or []
    rows = [{"neighbour": f"{n['prompt']} →{n['true_target']}", "p(true) before": n["p_true_before"],
             "p(true) after": n["p_true_after"], "change": f"{100 * n['relative_change']:+.0f}%",
             "top MLP layer": f"{n['top_mlp_layer_before']} → {n['top_mlp_layer_after']}",
             "top head": f"{_num([n['top_head_before']])} → {_num([n['top_head_after']])}"} for n in per]
    return table(rows, list(rows[0])) if rows else ""


def mechanism_html(m: Mapping) -> list[str]:
    """One section per check: its outcome, what it tests (the rule) and its numbers as a table."""
    out = ["<h2>Mechanism (the analyses re-run on the edited model)</h2>",
           "<p class=\"note\">Knockout and enrichment compare the old target before the edit with the new target "
           "after it; extraction and locality show both targets at both times.</p>"]
    for name in CHECKS:
        if name not in m:
            continue
        c = m[name]
        passed = c.get("passed") if c.get("applicable", True) else None
        out.append(f"<h3 id=\"check-{name}\">{name.capitalize()}: {_outcome(passed)}</h3>")
        if c.get("rule"):
            out.append(f"<p class=\"rule\">Rule: {html.escape(c['rule'])}.</p>")
        out.append(check_table(c))
        if name == "locality":
            out.append(_neighbour_table(c))
    out.append(f"<p>Mechanism {_outcome(m.get('passed'))} (every applicable check must pass).</p>")
    return out


def verification_report(d: dict) -> str:
    """The HTML of one verification (a `Verification.to_dict()`): verdict first, then the edit, behaviour,
    generations, each mechanistic check and the figures."""
    from locedit.verification.plots import verification_figure

    b, before, m = d["behaviour"], d["behaviour"]["before"], d.get("mechanism")
    key_token = (m or {}).get("enrichment", {}).get("token")
    facts = "".join(f"<li><b>{html.escape(f['prompt'])}</b> {html.escape(repr(f['true_target']))} → "
                    f"<b>{html.escape(repr(f['new_target']))}</b></li>" for f in d["facts"])
    sections = [
        verdict_html(d),
        *verdict_scores_html(d.get("verdict")),
        "<h2>The edit</h2>",
        f"<p>{html.escape(sites_in_words(d['method'], d['sites'], key_token))}, on model "
        f"<code>{html.escape(str(d['model']))}</code> (verified in {d['seconds']:.1f} s).</p><ul>{facts}</ul>",
        *weight_diff_html(d.get("weight_diff")),
        "<h2>Behaviour (before → after; before = the unedited model)</h2>",
        table([{"metric": name, "before": _v(before.get(key)), "after": _v(b.get(key))}
               for name, key in BEHAVIOUR_ROWS], ["metric", "before", "after"]),
        f"<p>Neighbourhood KL (CounterFact+, before ‖ after): <b>{_v(b.get('neighborhood_kl'), '.4f')}</b> nats; "
        f"perplexity drift {_v(100 * b['perplexity_drift'], '+.2f')}%. Behaviour {_outcome(b['passed'])}. "
        f"Rule: {html.escape(b['rule'])}.</p>",
        "<h2>Generations (greedy)</h2>",
    ]
    for fact in b["per_fact"][:3]:
        rows = [{"prompt": gb["prompt"], "before": gb["text"], "after": ga["text"]}
                for gb, ga in zip(fact["generations_before"], fact["generations_after"])]
        sections.append(table(rows, ["prompt", "before", "after"]))
    if m is not None:
        sections += mechanism_html(m)
    sections += ripple_html(d.get("ripple"))
    sections += ["<h2>Figures</h2>", figure_html(figure_data_uri(verification_figure(d)),
                                                 "Before/after: probabilities, knockout, extraction heads, "
                                                 "enrichment")]
    f0 = d["facts"][0]
    return page(f"locedit verify: “{f0['prompt']}” {f0['true_target'].strip()} → {f0['new_target'].strip()}",
                sections)


def verify_and_report(lm, edit, out_dir: str | Path, **verify_options):
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
