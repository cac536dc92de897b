"""The verification report's structure on a real ROME edit of a tiny model: the verdict comes first and says what it
means, the sites are described in words, each mechanistic check has its own table, and no raw JSON is dumped."""

import copy
import json
import re
from html import unescape
from html.parser import HTMLParser

import pytest

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.verification import verify
from locedit.verification.report import (CHECK_MEANING, CHECKS, VERDICT_MEANING, sites_in_words,
                                         verification_report)


def _edit(lm, fact, new_target, **options):
    """A ROME edit through the public API (`edit(lm, EditRequest)`; the older `edit(lm, fact, new)` form until the
    renames land)."""
    try:
        return locedit.edit(lm, EditRequest(fact, new_target), **options)
    except TypeError:
        return locedit.edit(lm, fact, new_target, **options)


@pytest.fixture(scope="module")
def verification():
    lm = tiny.lm("llama", "metaspace")
    prompt = Fact("Eiffel Tower", "The Eiffel Tower is located in the city of")
    fact = Fact(prompt.subject, prompt.prompt, lm.predict(prompt)[0].token)
    edit = _edit(lm, fact, " Rome", layers=[0], key_position="subject_last")
    try:
        ver = verify(lm, edit, neighborhood=["The Louvre is in", ("Big Ben is in", " London")],
                     paraphrases=["Eiffel Tower is in the city of"], generation_tokens=4, fluency_tokens=6)
    finally:
        edit.revert()
    return ver.to_dict()


class Outline(HTMLParser):
    """The body's elements in order: (tag, attributes, text inside the element, text of its direct tag only)."""

    def __init__(self):
        super().__init__()
        self.elements, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        entry = [tag, dict(attrs), ""]
        self.elements.append(entry)
        if tag not in ("br", "img", "meta", "hr"):
            self.stack.append(entry)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        for entry in self.stack:
            entry[2] += data


def outline(html_text):
    parser = Outline()
    parser.feed(html_text.split("<body>", 1)[1])
    return parser.elements


def test_report_opens_with_the_verdict_and_what_it_means(verification):
    els = outline(verification_report(verification))
    assert els[0][0] == "h1"
    first = els[1]
    assert first[0] == "div" and first[1].get("id") == "verdict", first
    text = " ".join(first[2].split())
    verdict = "PASSED" if verification["passed"] else "FAILED"
    assert text.startswith(f"Verdict: {verdict}")
    assert VERDICT_MEANING[verification["passed"]] in text
    # one sentence per outcome: behaviour and each mechanistic check
    items = [" ".join(e[2].split()) for e in els[2:] if e[0] == "li"][:1 + len(CHECKS)]
    assert items[0].split(" ")[1] == "Behaviour" and all(item in text for item in items)
    m = verification["mechanism"]
    for name in CHECKS:
        assert CHECK_MEANING[name][bool(m[name]["passed"])] in text, name
    # nothing but the title comes before the verdict
    assert els.index(first) == 1


def test_sites_are_described_in_words(verification):
    html_text = verification_report(verification)
    token = verification["mechanism"]["enrichment"]["token"]
    expected = f"ROME edit of layer 0's MLP, keyed at {token!r} (the subject's last token); the layers were given"
    assert expected in unescape(html_text)


def test_each_check_has_its_own_table_of_numbers(verification):
    els = outline(verification_report(verification))
    m = verification["mechanism"]
    for name in CHECKS:
        heading = next(i for i, e in enumerate(els) if e[0] == "h3" and e[1].get("id") == f"check-{name}")
        outcome = "PASSED" if m[name]["passed"] else "FAILED"
        assert outcome in els[heading][2]
        table = next(e for e in els[heading + 1:] if e[0] == "table")
        nxt = next((i for i, e in enumerate(els[heading + 1:], heading + 1) if e[0] == "h3"), len(els))
        assert els.index(table) < nxt, f"{name}: no table before the next check"
        assert table[1].get("class") == "check"
        cells = [e[2] for e in els[els.index(table):nxt] if e[0] == "td"]
        assert len(cells) >= 6, (name, cells)
    knockout = m["knockout"]
    rows = {e[2] for e in els if e[0] == "tr"}
    assert (f"critical layer (largest drop){knockout['critical_layer_before']}"
            f"{knockout['critical_layer_after']}") in rows


def test_no_raw_json_or_key_value_dumps(verification):
    html_text = verification_report(verification)
    body = unescape(html_text.split("<body>", 1)[1])
    assert json.dumps(verification["sites"]) not in body
    assert not re.search(r"\{\s*\"\w+\"\s*:", body), "a JSON object is dumped into the page"
    assert not re.search(r"\b[a-z]+(_[a-z]+)+=", body), "a key=value string is dumped into the page"
    assert "carrier_offsets" not in body and "critical_layer_before" not in body


def test_a_passing_verification_says_so(verification):
    d = copy.deepcopy(verification)
    d["passed"] = d["behaviour"]["passed"] = d["mechanism"]["passed"] = True
    for name in CHECKS:
        d["mechanism"][name]["passed"] = True
        d["mechanism"][name]["applicable"] = True
    els = outline(verification_report(d))
    text = " ".join(els[1][2].split())
    assert text.startswith("Verdict: PASSED") and VERDICT_MEANING[True] in text and "FAILED" not in text


def test_sites_in_words_for_each_method():
    assert sites_in_words("rome", {"layers": [1], "key_position": "subject_last", "located": True,
                                   "layer_source": "measured"}, " Tower") == (
        "ROME edit of layer 1's MLP, keyed at ' Tower' (the subject's last token); the layer is this model's "
        "measured edit layer")
    assert sites_in_words("rome", {"layers": [1], "key_position": "subject_last", "located": True,
                                   "layer_source": "calibrated"}, " Tower").endswith(
        "; the layer is the calibrated edit layer of these weights (locedit calibrate)")
    assert sites_in_words("memit", {"layers": [3, 4, 5, 6, 7], "key_position": "carrier"}) == (
        "MEMIT edit of layers 3–7's MLPs, keyed at the subject token that carries the fact, by locate's causal "
        "trace; the layers were given")
    assert sites_in_words("head", {"layers": [23, 29], "heads": [[23, 4], [29, 1]], "located": True}) == (
        "Head edit of L23H4, L29H1 (their attention parameters), the extraction heads `locate` found")
    assert sites_in_words("ft", {"layers": [2], "key_position": "subject_last"}).startswith(
        "FT-L fine-tuning edit of layer 2's MLP;")
