"""SmolLM2 acceptance: the located ROME edit Eiffel Tower -> " Rome" verifies (ES = 1, the greedy generation from
the prompt says Rome, NS over the Paris neighbours, every mechanistic check computed and passing), and a
deliberately wrong-site edit (the last layer) is told apart by the mechanistic checks."""

import numpy as np

import locedit
from locedit.verification import metrics as M
from locedit.verification import verify

NEIGHBOURS = ["The Louvre is located in the city of", "Notre-Dame de Paris is located in the city of",
              "The Arc de Triomphe is located in the city of"]
PARAPHRASES = ["The Eiffel Tower can be found in the city of"]


def test_eiffel_to_rome_verifies_and_wrong_site_is_told_apart(smollm2, eiffel):
    lm = smollm2
    sitemap = locedit.locate(lm, eiffel)
    rank_one = sitemap.recommendation["rank_one"]  # the located site (SmolLM2's default is its calibrated layer)
    edit = locedit.edit(lm, locedit.EditRequest(eiffel, " Rome"),
                        layers=rank_one["located_layers"], key_position="carrier", sites=sitemap)
    try:
        ver = verify(lm, edit, neighborhood=NEIGHBOURS, paraphrases=PARAPHRASES, sites=sitemap,
                     fluency_tokens=10)
        # NS by hand on the edited model: the share of neighbours where P(" Paris") > P(" Rome")
        p = M.target_probs(lm, [(n, t) for n in NEIGHBOURS for t in (" Paris", " Rome")])
        ns_by_hand = float(np.mean([p[2 * i] > p[2 * i + 1] for i in range(len(NEIGHBOURS))]))
    finally:
        edit.revert()
    b, m = ver.behaviour, ver.mechanism
    assert b["before"]["efficacy_score"] == 0.0 and b["efficacy_score"] == 1.0
    assert b["generation_efficacy_prompt"] is True
    assert "Rome" in b["per_fact"][0]["generations_after"][0]["text"]
    assert b["before"]["neighborhood_score"] == 1.0 and b["neighborhood_score"] == ns_by_hand
    assert len(b["per_fact"][0]["neighborhood"]) == 3 and all(t == " Paris" for _, t in
                                                               b["per_fact"][0]["neighborhood"])
    assert b["neighborhood_kl"] > 0  # the edit changes the prefixed neighbours' next-token distributions
    for name in ("knockout", "extraction", "enrichment", "locality"):
        assert m[name]["passed"] is not None, name
    assert m["passed"] is True and ver.passed

    # the same new target written at the last layer: not through the located mechanism
    wrong = locedit.edit(lm, locedit.EditRequest(eiffel, " Rome"),
                         layers=[lm.num_layers - 1], key_position="subject_last",
                         hparams={"mom2_adjustment": False})
    try:
        bad = verify(lm, wrong, sites=sitemap, fluency_tokens=5)
    finally:
        wrong.revert()
    bm = bad.mechanism
    assert bm["passed"] is False
    assert bm["extraction"]["passed"] is False and bm["enrichment"]["passed"] is False
    assert bm["extraction"]["new_minus_old_after"] < m["extraction"]["new_minus_old_after"]
