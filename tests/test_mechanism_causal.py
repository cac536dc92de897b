"""The causal enrichment measurements on tiny random models, checked against what they mean: the residual patch
replaces exactly the state it names, and the OV read is the head's OV circuit applied to the subject state."""

import pytest
import torch

import locedit
import tiny
from locedit import EditRequest, Fact
from locedit.core.engine import Capture, run
from locedit.verification import mechanism as mech

FAST = {"v_num_grad_steps": 40, "clamp_norm_factor": 10, "context_template_length_params": [[3, 2]]}
FACT = Fact("Eiffel Tower", "The city of the Eiffel Tower", " Paris")  # the subject is the last token
NEW = " the"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))


def _setup(lm, layer):
    enc = lm.encode(FACT)
    return mech.MechanismSetup(FACT, NEW, layer, enc.subject_end - 1, None, [])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patch_at_the_final_output_swaps_the_prediction(family):
    """An edit of the last layer keyed at the subject, which is the last token: the state leaving the edited layer
    there is the final output, so patching it moves p exactly to the other model's (sufficiency and necessity are
    then the whole edit), and patching a model's own state changes nothing."""
    lm = tiny.lm(family)
    last = lm.num_layers - 1
    setup = _setup(lm, last)
    before = mech.measure(lm, setup, after=False)
    edit = locedit.edit(lm, EditRequest(FACT, NEW), method="rome", layers=[last], key_position="subject_last",
                        hparams=FAST)
    after = mech.measure(lm, setup, after=True, heads=before["ov_heads"])
    after["patched"] = mech.cross_patch(lm, setup, after, before)
    own = mech.cross_patch(lm, setup, after, after)
    edit.revert()
    before["patched"] = mech.cross_patch(lm, setup, before, after)
    assert before["patched"][1] == pytest.approx(after["readout"]["p"][1], rel=1e-4)  # unedited + edited state
    assert after["patched"][1] == pytest.approx(before["readout"]["p"][1], rel=1e-4)  # edited + unedited state
    assert own[1] == pytest.approx(after["readout"]["p"][1], rel=1e-5)
    s, n = mech.sufficiency_check(before, after, setup), mech.necessity_check(before, after, setup)
    assert s["share_of_edit"] == pytest.approx(1.0, abs=1e-3) and n["share_of_edit"] == pytest.approx(1.0, abs=1e-3)
    assert s["logodds_gain"] > 0 and s["passed"] == mech.sufficiency_rule(s["logodds_gain"])


def test_no_edit_scores_zero_everywhere():
    lm = tiny.lm("llama")
    setup = _setup(lm, 1)
    a = mech.measure(lm, setup, after=False)
    b = mech.measure(lm, setup, after=False, heads=a["ov_heads"])
    a["patched"], b["patched"] = mech.cross_patch(lm, setup, a, b), mech.cross_patch(lm, setup, b, a)
    assert mech.sufficiency_check(a, b, setup)["logodds_gain"] == pytest.approx(0.0, abs=1e-5)
    assert mech.necessity_check(a, b, setup)["logodds_drop"] == pytest.approx(0.0, abs=1e-5)
    assert mech.ov_check(a, b, setup.position)["gain"] == pytest.approx(0.0, abs=1e-5)


def test_ov_read_is_the_heads_ov_circuit_on_the_subject_state():
    """By hand for llama: z_h = W_V,h · RMSNorm(x_s) (the kv head of query head h), its output W_O[:, h] z_h, read
    as a direct logit of the final residual; the engine's read (every key but s blocked) must equal it."""
    lm = tiny.lm("llama")
    enc = lm.encode(FACT)
    pos = enc.subject_start  # not the last token: the read must come from this state only
    layer = lm.num_layers - 1
    heads = [(layer, 0), (layer, lm.num_heads - 1)]
    caps = run(lm, enc, capture=Capture(residual=True)).captures
    final = caps["residual", lm.num_layers][0, -1]
    ids = [lm.encode(FACT).target_id, lm.encode(Fact(FACT.subject, FACT.prompt, NEW)).target_id]
    got, patched = mech.ov_reads(lm, enc, heads, pos, final, ids)
    assert patched is None
    block = lm.model.model.layers[layer]
    x = block.input_layernorm(caps["residual", layer][0, pos][None])[0]
    group = lm.num_heads // lm.num_kv_heads
    for (l, h), row in zip(heads, got):
        kv = h // group
        w_v = block.self_attn.v_proj.weight[kv * lm.head_dim:(kv + 1) * lm.head_dim]
        z = w_v @ x
        part = block.self_attn.o_proj.weight[:, h * lm.head_dim:(h + 1) * lm.head_dim] @ z
        want = [float(lm.target_logit(final, t) - lm.target_logit(final - part, t)) for t in ids]
        assert row == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_measure_shares_its_forwards_without_changing_a_number(family):
    """measure reads the prompt and its neighbours from one padded clean pass, resolves the target from it and
    patches the other state's residual in the OV reads' forward: each number equals the analysis run alone."""
    from locedit.localization.knockout import attention_knockout, position_groups

    lm = tiny.lm(family)
    neighbours = [("The city of the Louvre is", " Paris"), ("Rome", " is")]  # a second prompt of another length
    enc = lm.encode(FACT)
    setup = mech.MechanismSetup(FACT, NEW, 1, enc.subject_end - 1, None, neighbours)
    other = mech.measure(lm, setup, after=False)
    state = other["readout"]["states"][2] * 1.5  # any residual state will do
    got = mech.measure(lm, setup, after=True, heads=other["ov_heads"], patch_state=state)

    alone = run(lm, enc, capture=Capture(residual=True))
    probs = alone.probs()[0]
    assert got["readout"]["p"] == pytest.approx([float(probs[got["old_id"]]), float(probs[got["new_id"]])],
                                                rel=1e-4, abs=1e-7)
    assert got["readout"]["states"][3] == pytest.approx(alone.captures["residual", 3][0, setup.position], abs=1e-5)
    groups = {k: v for k, v in position_groups(enc).items() if k in ("subject", "non_subject", "last")}
    tracked = lm.encode(Fact(FACT.subject, FACT.prompt, NEW))
    ko = attention_knockout(lm, tracked, window=min(mech.KNOCKOUT_WINDOW, lm.num_layers), groups=groups).to_dict()
    assert got["knockout"]["probs"].keys() == ko["probs"].keys()
    for group, curve in ko["probs"].items():
        assert got["knockout"]["probs"][group] == pytest.approx(curve, rel=1e-4, abs=1e-7)
    assert got["knockout"]["base_prob"] == pytest.approx(ko["base_prob"], rel=1e-4)
    want = mech.cross_patch(lm, setup, got, {"readout": {"states": {2: state}}})
    assert got["patched"] == pytest.approx(want, rel=1e-4, abs=1e-7)
    for (prompt, true), n in zip(neighbours, got["neighbours"]):
        from locedit.verification.metrics import prompt_ids, target_ids

        ids = prompt_ids(lm, prompt)
        p = run(lm, ids).probs()[0, target_ids(lm, prompt, true, ids)[0]]
        assert n["p_true"] == pytest.approx(float(p), rel=1e-4, abs=1e-7)
    assert "patched" not in mech.measure(lm, setup, after=False)
