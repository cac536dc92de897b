"""Mechanistic verification: is the new attribute retrieved through the same mechanism as the old one?

After the edit, locedit's own analyses are re-run on the edit prompt for the **new** target and compared with the
same analyses for the **old** target on the unedited model (measured with the edit reverted). Seven checks, each
with its numbers, a continuous score, a pass rule and its evidence (the thresholds are the module constants below,
chosen on control edits; `IN_RULE` names the checks the verdict counts, the others are evidence):

* **sufficiency** / **necessity** (causal enrichment): the residual leaving the (last) edited layer at the subject key
  position, taken from the edited model and patched into the unedited one, raises the log-odds of p(new) by at
  least `SUFFICIENCY_MIN_LOGODDS`; the unedited state patched into the edited model lowers it by at least
  `NECESSITY_MIN_LOGODDS` (`SetResidual`: a row of the after-state measure's run, and one forward). Not applicable to edits that change no layer.
* **OV read**: the extraction heads with every key but the subject key position blocked (`BlockAttention`: the
  head's OV circuit applied to the subject state), read as direct logits of new - old at the last position; passes
  when that rose by at least `OV_MIN_GAIN`.

* **knockout** (attention knockout, `locedit.localization.attention_knockout`, window 9, groups subject / non-subject /
  last): blocking last -> subject must still cut the prediction, at about the same layers. Passes when, after the
  edit, blocking the subject at its critical window (where it hurts most) lowers the log-odds of p(new) by at least
  `KNOCKOUT_MIN_LOGODDS` (log-odds rather than the relative change: an edit saturates p(new) near 1, where
  relative drops look small), the drop-weighted centre of the subject curve moved by at most `KNOCKOUT_MAX_SHIFT`
  layers from the old target's before the edit (the argmin is reported too; it jumps when the minimum is broad),
  and the subject curves before (old) and after (new) correlate with Pearson r >= `KNOCKOUT_MIN_CORR`.
* **extraction**: do the fact's top extraction heads now write the new target? Heads: the SiteMap's top
  `TOP_HEADS` heads when a SiteMap is given (or the edit's `sites["extraction_heads"]`), else the `TOP_HEADS`
  heads with the largest direct logit attribution to the old target before the edit (the strongest of SiteMap's
  head evidence, at the cost of one forward). Direct
  logit of a head = the target's logit from the final residual minus the logit without that head's output at the
  last position (as `locedit.localization.heads.head_effects`). Passes when, summed over those heads, the direct logit of
  the new target after the edit exceeds the old target's after the edit, and rose by at least
  `EXTRACTION_MIN_GAIN` (logits) from before the edit. Evidence: per-head values, and extraction events (layers
  whose attention / MLP output at the last position projects to the target at top-1) for old-before and new-after.
* **enrichment**: at the edited layer and key position (a subject token; the subject's last token when the edit
  keyed elsewhere), the logit-lens projection (`lm.project`, the model's final norm and unembedding) of the subject
  state leaving each layer from the edited one to the second-to-last (the final output only for an edit at the
  last layer: there the subject position mostly reads its own next-token prediction, which any edit at that
  position writes directly). Passes when the best rank of the new target over those layers improved by at least a
  factor `ENRICHMENT_MIN_FACTOR` and is at most `ENRICHMENT_MAX_RANK`, and the old target's median rank over those
  layers did not improve (the old one ranks the same or lower). Its thresholds come from one calibration example
  (Eiffel Tower -> Rome); on control edits it does not separate the routes, so it is evidence, not in the verdict.
* **locality** (of mechanism), cheap by design (one forward per neighbour): for up to `LOCALITY_NEIGHBOURS`
  neighbourhood prompts, p(true) (first token), the top MLP layer and the top head (largest direct logit to the
  true target at the last position) before and after. Passes when every neighbour keeps its top MLP layer
  and its top head and its p(true) changes by at most `LOCALITY_MAX_REL_CHANGE` (relative). Not applicable without
  neighbours.

The mechanism passes when every applicable check of `IN_RULE` passes. Each check can fail: an edit keyed at the
prompt's last token writes the new target without changing the subject state (sufficiency and necessity near 0),
and a failed edit changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from locedit.core.engine import BlockAttention, Capture, SetResidual, run, run_batch
from locedit.core.facts import EncodedFact, Fact
from locedit.localization.heads import head_contributions
from locedit.localization.knockout import knockout_result, knockout_rows, position_groups
from locedit.localization.common import rank_of

KNOCKOUT_WINDOW = 9
KNOCKOUT_MIN_LOGODDS = 1.0
KNOCKOUT_MAX_SHIFT = 4
KNOCKOUT_MIN_CORR = 0.5
TOP_HEADS = 3
EXTRACTION_MIN_GAIN = 0.0
ENRICHMENT_MAX_RANK = 500
ENRICHMENT_MIN_FACTOR = 4.0
LOCALITY_NEIGHBOURS = 2
# Thresholds below and IN_RULE: chosen on the tuning facts of the control-edit validation run
# data/results/validate_verify/ (summary.json, `python recipes/validate_verify.py --n 100`: 50 tuning + 50 held-out
# SmolLM2 facts of data/facts/heldout, 7 controls each, 700 edits; Youden cut of (+) subject-keyed ROME/MEMIT at
# early layers against (-) last-token-keyed ROME and head-output edits, halfway into the gap). Held-out AUROC:
# sufficiency 1.00, necessity 1.00, locality 0.99. Knockout, extraction, OV read and the logit lens separated (+)
# from (-) with tuning AUROC < 0.8 (0.79, 0.57, 0.73, 0.54; held-out 0.90, 0.58, 0.73, 0.51): measured and
# reported as evidence, not part of the verdict.
LOCALITY_MAX_REL_CHANGE = 0.532
# causal enrichment (issue #17 §2): log-odds of p(new) in nats, the OV read in logits (OV_MIN_GAIN: same run)
SUFFICIENCY_MIN_LOGODDS = 0.344
NECESSITY_MIN_LOGODDS = 0.307
OV_MIN_GAIN = 0.222
# the checks the mechanism verdict is made of (tuning AUROC >= 0.8); the others are evidence
IN_RULE = ("sufficiency", "necessity", "locality")

RULES = {
    "knockout": f"after the edit, blocking last->subject lowers the log-odds of p(new) by >= "
                f"{KNOCKOUT_MIN_LOGODDS:g} at its critical window; the drop-weighted critical layer moved <= "
                f"{KNOCKOUT_MAX_SHIFT} layers from the old target's before the edit; Pearson r of the subject curves "
                f"(old before, new after) >= {KNOCKOUT_MIN_CORR:g}",
    "extraction": f"at the top {TOP_HEADS} extraction heads (SiteMap, else direct logit to the old target before "
                  f"the edit): sum of direct logits of new > old after the edit, and new rose by > "
                  f"{EXTRACTION_MIN_GAIN:g}",
    "enrichment": f"logit lens of the subject state leaving the edited layer .. layer L-2: best rank of new <= "
                  f"{ENRICHMENT_MAX_RANK} and improved >= {ENRICHMENT_MIN_FACTOR:g}x; median rank of old not "
                  "improved",
    "locality": f"up to {LOCALITY_NEIGHBOURS} neighbours keep their top MLP layer and top head, and p(true) "
                f"changes <= {LOCALITY_MAX_REL_CHANGE:.0%}",
    "sufficiency": f"the edited model's state leaving the edited layer at the subject key position, patched into "
                   f"the unedited model, raises the log-odds of p(new) by >= {SUFFICIENCY_MIN_LOGODDS:g}",
    "necessity": f"the unedited model's state leaving the edited layer at the subject key position, patched into "
                 f"the edited model, lowers the log-odds of p(new) by >= {NECESSITY_MIN_LOGODDS:g}",
    "ov_read": f"the extraction heads' OV circuits reading only the subject key position (every other key "
               f"blocked): summed direct logit of new minus old rose by >= {OV_MIN_GAIN:g}",
}


@dataclass
class MechanismSetup:
    """What the checks look at for one edited fact."""

    fact: Fact             # the edit prompt with its true (old) target
    new_target: str        # as it continues the prompt
    layer: int | None      # the (last) edited MLP layer, None for edits without one
    position: int          # the subject position whose state the enrichment check reads
    heads: list | None     # SiteMap heads [(layer, head)], None = rank by direct logit before the edit
    neighbours: list       # [(Fact or prompt, true target)]


def token_id(lm, prompt: str, subject: str, target: str) -> int:
    return int(lm.encode(Fact(subject, prompt, target)).target_id)


def setup_for(lm, fact: Fact, new_target: str, sites: dict | None, index: int, neighbours: Sequence,
              sitemap=None) -> MechanismSetup:
    """The check's inputs from an edit's `sites` (layers, key positions) and an optional SiteMap (or its dict)."""
    sites = sites or {}
    enc = lm.encode(fact)
    layers = [int(l) for l in (sites.get("layers") or [])]
    subject = list(enc.positions.subject)
    position = None
    positions = sites.get("positions") or []
    offsets = sites.get("carrier_offsets") or []
    if index < len(positions) and positions[index] is not None:
        position = positions[index]
        if isinstance(position, (list, tuple)):
            position = position[-1] if position else None
    elif sites.get("key_position") == "carrier" and index < len(offsets) and offsets[index] is not None:
        position = enc.subject_start + int(offsets[index])
    if position is None or int(position) % len(enc) not in subject:
        position = enc.positions.subject_last
    heads = None
    if sitemap is not None:
        d = sitemap.to_dict() if hasattr(sitemap, "to_dict") else sitemap
        heads = [(int(h["layer"]), int(h["head"])) for h in d.get("heads", [])[:TOP_HEADS]] or None
    elif index == 0 and sites.get("extraction_heads"):  # the SiteMap's top heads, when the edit recorded them
        heads = [(int(l), int(h)) for l, h in sites["extraction_heads"][:TOP_HEADS]]
    return MechanismSetup(fact, new_target, max(layers) if layers else None, int(position) % len(enc), heads,
                          list(neighbours)[:LOCALITY_NEIGHBOURS])


# --- one model state -------------------------------------------------------------------------------------------------
_CLEAN_CAPTURE = Capture(residual=True, heads=True, attn=True, mlp=True)


@torch.no_grad()
def _clean_pass(lm, enc: EncodedFact, neighbour_ids: Sequence[Sequence[int]]):
    """One right-padded forward of the edit prompt and the neighbour prompts (padding changes no number), with
    the residual stream, attention and MLP outputs and heads captured: what the readouts below all read."""
    return run_batch(lm, [enc] + [list(ids) for ids in neighbour_ids], capture=_CLEAN_CAPTURE, padding_side="right")


def _state_readout(lm, caps, token_ids: Sequence[int], position: int, logits: torch.Tensor) -> dict:
    """Row 0 of the clean pass: per-head direct logits (L, H, tokens), extraction-event top-1s, logit-lens ranks of
    the tokens in the residual stream at `position` (entering each layer and the final output, L+1 rows)."""
    L = lm.num_layers
    last = caps.last()
    final = last["residual", L][0]
    contributions = torch.stack([head_contributions(lm, layer, {("heads", layer): last["heads", layer]})
                                 for layer in range(L)])  # (L, H, d)
    ids = torch.tensor(list(token_ids), device=final.device)
    dla = direct_logits(lm, final, contributions, token_ids).cpu().numpy()  # (L, H, tokens)
    attn = lm.project(torch.stack([last["attn", l][0] for l in range(L)]), "model").float().argmax(-1)
    mlp = lm.project(torch.stack([last["mlp", l][0] for l in range(L)]), "model").float().argmax(-1)
    states = torch.stack([caps.row("residual", l, 0)[position] for l in range(L + 1)])
    scores = lm.project(states, "model").float()
    ranks = np.stack([rank_of(scores, int(t)).cpu().numpy() for t in token_ids], axis=1)  # (L+1, tokens)
    return {"dla": dla, "attn_top1": attn.tolist(), "mlp_top1": mlp.tolist(), "ranks": ranks,
            "states": states.detach().cpu(), "final": final.detach().cpu(),
            "p": logits.float().softmax(-1)[ids.to(logits.device)].tolist()}  # p(tokens) at the last position


def direct_logits(lm, final: torch.Tensor, parts: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Direct logit of each part (..., d) of the final residual `final` (d,) for each token: the token's logit from
    `final` minus its logit from `final - part` (the final norm sees the whole residual). Returns (..., tokens)."""
    final = final.to(parts.device)
    return torch.stack([lm.target_logit(final, int(t)) - lm.target_logit(final - parts, int(t)) for t in token_ids],
                       dim=-1)


def _neighbour_prompt(lm, prompt: Fact | str, true_target: str) -> tuple[str, list[int], str, int]:
    """A neighbour prompt's text, token ids, true target and the first token id of that target."""
    from locedit.verification.metrics import prompt_ids, target_ids

    text = prompt.prompt if isinstance(prompt, Fact) else prompt
    pids = prompt_ids(lm, text)
    return text, list(pids), true_target, int(target_ids(lm, text, true_target, pids)[0])


def _neighbour_readout(lm, caps, row: int, logits: torch.Tensor, neighbour: tuple) -> dict:
    """Row `row` of the clean pass (a neighbour prompt): p(true first token), the top MLP layer and the top head:
    the largest direct logit to the true target at the last position (the target's logit from the final residual
    minus the logit without that MLP's / head's output). `neighbour`: its `_neighbour_prompt`."""
    text, _, true_target, true_id = neighbour
    L = lm.num_layers
    p_true = float(logits.float().softmax(-1)[true_id])
    final = caps["residual", L][row]
    contributions = torch.stack([head_contributions(lm, layer, caps, row=row) for layer in range(L)])
    dla = direct_logits(lm, final, contributions, [true_id])[..., 0].cpu().numpy()
    mlps = torch.stack([caps["mlp", layer][row] for layer in range(L)])
    mlp_dla = direct_logits(lm, final, mlps, [true_id])[..., 0].cpu().numpy()
    top_head = np.unravel_index(int(np.argmax(dla)), dla.shape)
    return {"prompt": text, "true_target": true_target, "p_true": p_true,
            "top_mlp_layer": int(np.argmax(mlp_dla)), "mlp_direct_logit": mlp_dla.tolist(),
            "top_head": [int(top_head[0]), int(top_head[1])], "top_head_dla": float(dla[top_head])}


@torch.no_grad()
def measure(lm, setup: MechanismSetup, *, after: bool, heads: list | None = None,
            patch_state: torch.Tensor | None = None) -> dict:
    """Everything the checks need from the current model state: the old target's analyses before the edit
    (`after=False`), the new target's after it. `heads`: the extraction heads whose OV reads are measured (default:
    the setup's, else those with the largest direct logit to the old target in this state). `patch_state`: the
    other state's residual leaving the edited layer at the key position, whose `patched_probs` then come from the
    OV reads' forward (`"patched"`).

    Forwards: one clean pass of the prompt and the neighbour prompts (every readout, the target), then one run of
    the prompt (prefix reuse) with the knockout's rows, the OV reads' rows and the patched row."""
    from locedit.localization.common import CleanRun, resolve_targets

    fact = setup.fact
    old_id = token_id(lm, fact.prompt, fact.subject, fact.target)
    new_id = token_id(lm, fact.prompt, fact.subject, setup.new_target)
    tracked = Fact(fact.subject, fact.prompt, setup.new_target if after else fact.target)
    enc = lm.encode(tracked)
    neighbour_prompts = [_neighbour_prompt(lm, p, t) for p, t in setup.neighbours]
    clean = _clean_pass(lm, enc, [ids for _, ids, _, _ in neighbour_prompts])
    target = resolve_targets(lm, [enc], CleanRun(clean.captures, clean.logits[:1]))[0]
    readout = _state_readout(lm, clean.captures, [old_id, new_id], setup.position, clean.logits[0])
    heads = heads or setup.heads or top_heads(readout["dla"])
    last = clean.captures.last()
    neighbours = [_neighbour_readout(lm, last, j + 1, clean.logits[j + 1], neighbour)
                  for j, neighbour in enumerate(neighbour_prompts)]
    # one run of the prompt: the knockout's rows, then the OV reads' rows, then the patched row
    groups = {k: v for k, v in position_groups(enc).items() if k in ("subject", "non_subject", "last")}
    window = min(KNOCKOUT_WINDOW, lm.num_layers)
    named, knockout_rows_, keys = knockout_rows(lm, enc, window, groups, None)
    patch = None if patch_state is None or setup.layer is None else (setup.layer, setup.position, patch_state)
    rows, layers = _ov_rows(lm, enc, heads, setup.position, patch)
    result = run(lm, enc, knockout_rows_ + rows, capture=Capture(heads=True, layers=layers, last_only=True))
    k = len(knockout_rows_)
    knockout = knockout_result(enc, target, window, named, keys,
                               result.prob_of(target.token_id)[:k].float().cpu().numpy())
    ov, patched = _ov_values(lm, result, k, heads, readout["final"], [old_id, new_id], patch is not None)
    out = {"old_id": old_id, "new_id": new_id, "knockout": knockout.to_dict(), "readout": readout,
           "neighbours": neighbours, "ov_heads": [list(h) for h in heads], "ov": ov}
    if patch is not None:
        out["patched"] = patched
    return out


def top_heads(dla: np.ndarray) -> list[tuple[int, int]]:
    """The TOP_HEADS heads with the largest direct logit to the old target (dla: (L, H, [old, new]))."""
    order = np.argsort(-dla[..., 0], axis=None)[:TOP_HEADS]
    return [tuple(int(x) for x in np.unravel_index(int(i), dla.shape[:2])) for i in order]


@torch.no_grad()
def ov_reads(lm, enc: EncodedFact, heads: Sequence, position: int, final: torch.Tensor,
             token_ids: Sequence[int], patch: tuple | None = None) -> tuple[list[list[float]], list[float] | None]:
    """Per head, the direct logits of the tokens (old, new) of what the head writes at the last position when it
    may attend only to `position` (every other key blocked, so its softmax puts all weight there): its OV circuit
    applied to the subject state, read as the extraction check reads a head (final residual with and without it).
    `patch` = (layer, position, state): one more row of the same forward, with the residual leaving `layer` at
    `position` set to `state` (`patched_probs`); its p(tokens) are the second value (None without `patch`)."""
    rows, layers = _ov_rows(lm, enc, heads, position, patch)
    out = run(lm, enc, rows, capture=Capture(heads=True, layers=layers, last_only=True))
    return _ov_values(lm, out, 0, heads, final, token_ids, patch is not None)


def _ov_rows(lm, enc: EncodedFact, heads: Sequence, position: int, patch: tuple | None) -> tuple[list, list[int]]:
    """`ov_reads`' rows (one per head, then the patched row when `patch`) and the layers whose heads it reads."""
    n = len(enc)
    others = [p for p in range(n) if p != position]
    rows = [[BlockAttention([l], [n - 1], others, heads=[h])] for l, h in heads]
    if patch is not None:
        rows.append([_patch_row(lm, *patch)])
    return rows, sorted({l for l, _ in heads})


def _patch_row(lm, layer: int, position: int, state: torch.Tensor) -> SetResidual:
    """The intervention that sets the residual leaving `layer` at `position` to `state`."""
    return SetResidual(layer + 1, [position], state.to(lm.device)[None])


def _ov_values(lm, out, offset: int, heads: Sequence, final: torch.Tensor, token_ids: Sequence[int],
               patched: bool) -> tuple[list[list[float]], list[float] | None]:
    """The OV reads (and the patched row's p(tokens)) from a run whose `_ov_rows` start at row `offset`."""
    final = final.to(lm.device)
    parts = torch.stack([head_contributions(lm, l, {("heads", l): out.captures["heads", l]}, row=offset + j)[h]
                         for j, (l, h) in enumerate(heads)])
    probs = out.probs()[offset + len(heads), list(token_ids)].tolist() if patched else None
    return direct_logits(lm, final, parts, token_ids).tolist(), probs


@torch.no_grad()
def patched_probs(lm, setup: MechanismSetup, state: torch.Tensor, token_ids: Sequence[int]) -> list[float] | None:
    """p(old), p(new) (first tokens) in the current model with the residual leaving the edited layer at the key
    position replaced by `state` (the other model's); None when the edit changes no layer."""
    if setup.layer is None:
        return None
    tracked = lm.encode(setup.fact)
    out = run(lm, tracked, [[_patch_row(lm, setup.layer, setup.position, state)]])
    return out.probs()[0, list(token_ids)].tolist()


def patch_state(setup: MechanismSetup, measured: dict) -> torch.Tensor | None:
    """A measured state's residual leaving the edited layer at the key position (None when no layer is edited)."""
    return None if setup.layer is None else measured["readout"]["states"][setup.layer + 1]


def cross_patch(lm, setup: MechanismSetup, measured: dict, other: dict) -> list[float] | None:
    """`patched_probs` with the other state's residual leaving the edited layer at the key position."""
    if setup.layer is None:
        return None
    return patched_probs(lm, setup, patch_state(setup, other),
                         [measured["old_id"], measured["new_id"]])


# --- the pass rules: small pure functions of the numbers (unit-tested in tests/test_mechanism_rules.py) -------------
def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson r of two curves; 0.0 when either has fewer than two points or is constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def log_odds(p) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [1e-9, 1 - 1e-9]."""
    p = np.clip(np.asarray(p, float), 1e-9, 1 - 1e-9)
    return np.log(p / (1 - p))


def drop_weighted_centre(curve: Sequence[float]) -> float:
    """The drop-weighted mean layer of a knockout curve (a stabler critical layer than the argmin when the
    minimum is broad); the argmin when nothing drops."""
    drop = np.clip(-np.asarray(curve, float), 0, None)
    if drop.sum() <= 0:
        return float(np.argmin(curve))
    return float((np.arange(len(drop)) * drop).sum() / drop.sum())


def knockout_rule(logodds_drop_after: float, layer_shift: float, curve_correlation: float) -> bool:
    """Blocking the subject still lowers the log-odds of p(new) by >= KNOCKOUT_MIN_LOGODDS, the critical centre
    moved <= KNOCKOUT_MAX_SHIFT layers and the curves correlate with r >= KNOCKOUT_MIN_CORR (NaN fails)."""
    return bool(logodds_drop_after >= KNOCKOUT_MIN_LOGODDS and abs(layer_shift) <= KNOCKOUT_MAX_SHIFT
                and curve_correlation >= KNOCKOUT_MIN_CORR)


def extraction_rule(new_after: float, old_after: float, new_before: float) -> bool:
    """Summed over the heads: the new target's direct logit beats the old one's after the edit and rose by more
    than EXTRACTION_MIN_GAIN (NaN fails)."""
    return bool(new_after > old_after and new_after - new_before > EXTRACTION_MIN_GAIN)


def enrichment_layers(layer: int, num_layers: int) -> list[int]:
    """Logit-lens rows read (row l = the state entering layer l): leaving the edited layer .. leaving layer L-2;
    the final output (row L) only for an edit at the last layer, where the subject position mostly reads the
    next-token prediction, which an edit writes directly."""
    return list(range(layer + 1, num_layers)) or [num_layers]


def enrichment_rule(new_best_before: int, new_best_after: int, old_median_before: float,
                    old_median_after: float) -> bool:
    """The new target's best rank is <= ENRICHMENT_MAX_RANK and improved by a factor >= ENRICHMENT_MIN_FACTOR
    (on rank + 1, so rank 0 counts), and the old target's median rank did not improve (NaN fails)."""
    return bool(new_best_after <= ENRICHMENT_MAX_RANK
                and (new_best_after + 1) * ENRICHMENT_MIN_FACTOR <= new_best_before + 1
                and old_median_after >= old_median_before)


def relative_change(before: float, after: float) -> float:
    """(after - before) / before; 0.0 when `before` is not positive (no relative change can be measured)."""
    return (after - before) / before if before > 0 else 0.0


def locality_rule(same_sites: Sequence[bool], relative_changes: Sequence[float]) -> bool:
    """Every neighbour kept its top MLP layer and top head, and its p(true) changed by at most
    LOCALITY_MAX_REL_CHANGE (relative, either way; NaN fails)."""
    return bool(all(same and abs(change) <= LOCALITY_MAX_REL_CHANGE
                    for same, change in zip(same_sites, relative_changes, strict=True)))


def sufficiency_rule(logodds_gain: float) -> bool:
    """The edited state patched into the unedited model raised the log-odds of p(new) by >= SUFFICIENCY_MIN_LOGODDS
    (NaN fails)."""
    return bool(logodds_gain >= SUFFICIENCY_MIN_LOGODDS)


def necessity_rule(logodds_drop: float) -> bool:
    """The unedited state patched into the edited model lowered the log-odds of p(new) by >= NECESSITY_MIN_LOGODDS
    (NaN fails)."""
    return bool(logodds_drop >= NECESSITY_MIN_LOGODDS)


def ov_rule(gain: float) -> bool:
    """The extraction heads' OV read of the subject state: summed direct logit of new minus old rose by >=
    OV_MIN_GAIN (NaN fails)."""
    return bool(gain >= OV_MIN_GAIN)


def fraction(part: float, whole: float) -> float:
    """part / whole; NaN when `whole` is (about) zero: the share of the edit's effect a patch carries."""
    return float(part / whole) if abs(whole) > 1e-6 else float("nan")


def overall_rule(verdicts: Sequence[bool | None]) -> bool:
    """The mechanism passes when at least one check applies and every applicable one (not None) passed."""
    applicable = [v for v in verdicts if v is not None]
    return bool(applicable) and all(applicable)


# --- the checks ------------------------------------------------------------------------------------------------------
def knockout_check(before: dict, after: dict) -> dict:
    kb, ka = before["knockout"], after["knockout"]
    sb, sa = kb["relative_change"]["subject"], ka["relative_change"]["subject"]
    crit_b, crit_a = int(np.argmin(sb)), int(np.argmin(sa))
    centre_b, centre_a = drop_weighted_centre(sb), drop_weighted_centre(sa)
    corr = pearson(sb, sa)
    groups = sorted(set(kb["relative_change"]) & set(ka["relative_change"]))
    corr_all = pearson(np.concatenate([kb["relative_change"][g] for g in groups]),
                       np.concatenate([ka["relative_change"][g] for g in groups]))
    # log-odds of p(target) at the critical window, base minus blocked: robust to a saturated p(new) ~ 1
    lo_b = float(log_odds(kb["base_prob"]) - log_odds(kb["probs"]["subject"][crit_b]))
    lo_a = float(log_odds(ka["base_prob"]) - log_odds(ka["probs"]["subject"][crit_a]))
    shift = centre_a - centre_b
    passed = knockout_rule(lo_a, shift, corr)
    return {"critical_layer_before": crit_b, "critical_layer_after": crit_a,
            "critical_centre_before": centre_b, "critical_centre_after": centre_a, "layer_shift": shift,
            "subject_drop_before": -float(sb[crit_b]), "subject_drop_after": -float(sa[crit_a]),
            "subject_logodds_drop_before": lo_b, "subject_logodds_drop_after": lo_a,
            "curve_correlation": corr, "curve_correlation_all_groups": corr_all,
            "p_before": kb["base_prob"], "p_after": ka["base_prob"], "passed": bool(passed),
            "rule": RULES["knockout"],
            "evidence": {"before": kb["relative_change"], "after": ka["relative_change"], "window": kb["window"]}}


def extraction_check(lm, before: dict, after: dict, heads: list | None, source: str) -> dict:
    db, da = before["readout"]["dla"], after["readout"]["dla"]  # (L, H, [old, new])
    if heads is None:
        heads = top_heads(db)
    rows = [{"layer": l, "head": h, "old_before": float(db[l, h, 0]), "new_before": float(db[l, h, 1]),
             "old_after": float(da[l, h, 0]), "new_after": float(da[l, h, 1])} for l, h in heads]
    total = {k: float(sum(r[k] for r in rows)) for k in ("old_before", "new_before", "old_after", "new_after")}
    gain = total["new_after"] - total["new_before"]
    passed = extraction_rule(total["new_after"], total["old_after"], total["new_before"])
    old_id, new_id = before["old_id"], before["new_id"]
    events = {"attn_old_before": [l for l, t in enumerate(before["readout"]["attn_top1"]) if t == old_id],
              "mlp_old_before": [l for l, t in enumerate(before["readout"]["mlp_top1"]) if t == old_id],
              "attn_new_after": [l for l, t in enumerate(after["readout"]["attn_top1"]) if t == new_id],
              "mlp_new_after": [l for l, t in enumerate(after["readout"]["mlp_top1"]) if t == new_id]}
    return {"heads": [[l, h] for l, h in heads], "head_source": source, **{f"sum_{k}": v for k, v in total.items()},
            "new_gain": gain, "new_minus_old_after": total["new_after"] - total["old_after"],
            "new_minus_old_before": total["new_before"] - total["old_before"], "events": events,
            "passed": bool(passed), "rule": RULES["extraction"], "evidence": {"per_head": rows}}


def enrichment_check(before: dict, after: dict, layer: int | None, position: int, token: str) -> dict:
    if layer is None:
        return {"applicable": False, "passed": None, "reason": "the edit changes no MLP layer",
                "rule": RULES["enrichment"]}
    rb, ra = before["readout"]["ranks"], after["readout"]["ranks"]  # (L+1, [old, new]); row l = entering l
    rows = enrichment_layers(layer, rb.shape[0] - 1)
    best_b, best_a = int(rb[rows, 1].min()), int(ra[rows, 1].min())
    old_b, old_a = float(np.median(rb[rows, 0])), float(np.median(ra[rows, 0]))
    passed = enrichment_rule(best_b, best_a, old_b, old_a)
    return {"layer": layer, "position": position, "token": token, "layers_read": [rows[0] - 1, rows[-1] - 1],
            "new_rank_at_layer_before": int(rb[layer + 1, 1]), "new_rank_at_layer_after": int(ra[layer + 1, 1]),
            "new_best_rank_before": best_b, "new_best_rank_after": best_a,
            "old_median_rank_before": old_b, "old_median_rank_after": old_a, "applicable": True,
            "passed": bool(passed), "rule": RULES["enrichment"],
            "evidence": {"new_rank_before": rb[:, 1].tolist(), "new_rank_after": ra[:, 1].tolist(),
                         "old_rank_before": rb[:, 0].tolist(), "old_rank_after": ra[:, 0].tolist()}}


def _lo(p: float) -> float:
    return float(log_odds(p))


def sufficiency_check(before: dict, after: dict, setup: MechanismSetup) -> dict:
    """Patch the edited state into the unedited model: does p(new) rise?"""
    return _patch_check("sufficiency", before, after, setup, before.get("patched"))


def necessity_check(before: dict, after: dict, setup: MechanismSetup) -> dict:
    """Patch the unedited state into the edited model: does p(new) fall?"""
    return _patch_check("necessity", before, after, setup, after.get("patched"))


def _patch_check(name: str, before: dict, after: dict, setup: MechanismSetup, patched) -> dict:
    """Score one cross-patch: sufficiency's log-odds gain of p(new) over the unedited model, or necessity's drop
    from the edited one; `share_of_edit` is that change over the edit's own."""
    if setup.layer is None or patched is None:
        return {"applicable": False, "passed": None, "reason": "the edit changes no layer", "rule": RULES[name]}
    p_b, p_a, p_x = before["readout"]["p"][1], after["readout"]["p"][1], patched[1]
    if name == "sufficiency":
        key, score, rule = "logodds_gain", _lo(p_x) - _lo(p_b), sufficiency_rule
    else:
        key, score, rule = "logodds_drop", _lo(p_a) - _lo(p_x), necessity_rule
    return {"layer": setup.layer, "position": setup.position, "p_new_before": p_b, "p_new_after": p_a,
            "p_new_patched": p_x, key: score, "share_of_edit": fraction(score, _lo(p_a) - _lo(p_b)),
            "applicable": True, "passed": rule(score), "rule": RULES[name]}


def ov_check(before: dict, after: dict, position: int) -> dict:
    """The extraction heads' OV circuits reading the subject state: new minus old, before and after."""
    ob, oa = np.asarray(before["ov"], float).reshape(-1, 2), np.asarray(after["ov"], float).reshape(-1, 2)
    diff_b, diff_a = float((ob[:, 1] - ob[:, 0]).sum()), float((oa[:, 1] - oa[:, 0]).sum())
    gain = diff_a - diff_b
    rows = [{"layer": int(l), "head": int(h), "old_before": float(b[0]), "new_before": float(b[1]),
             "old_after": float(a[0]), "new_after": float(a[1])} for (l, h), b, a in zip(after["ov_heads"], ob, oa)]
    return {"heads": after["ov_heads"], "position": position, "new_minus_old_before": diff_b,
            "new_minus_old_after": diff_a, "gain": gain, "applicable": True, "passed": ov_rule(gain),
            "rule": RULES["ov_read"], "evidence": {"per_head": rows}}


def locality_check(before: dict, after: dict) -> dict:
    if not before["neighbours"]:
        return {"applicable": False, "passed": None, "reason": "no neighbourhood prompts",
                "rule": RULES["locality"]}
    rows = []
    for b, a in zip(before["neighbours"], after["neighbours"]):
        change = relative_change(b["p_true"], a["p_true"])
        rows.append({"prompt": b["prompt"], "true_target": b["true_target"], "p_true_before": b["p_true"],
                     "p_true_after": a["p_true"], "relative_change": change,
                     "top_mlp_layer_before": b["top_mlp_layer"], "top_mlp_layer_after": a["top_mlp_layer"],
                     "top_head_before": b["top_head"], "top_head_after": a["top_head"],
                     "same_sites": b["top_mlp_layer"] == a["top_mlp_layer"] and b["top_head"] == a["top_head"]})
    passed = locality_rule([r["same_sites"] for r in rows], [r["relative_change"] for r in rows])
    return {"neighbours": len(rows), "same_sites": sum(r["same_sites"] for r in rows),
            "max_abs_relative_change": max(abs(r["relative_change"]) for r in rows), "applicable": True,
            "passed": bool(passed), "rule": RULES["locality"], "evidence": {"per_neighbour": rows}}


def compare(lm, setup: MechanismSetup, before: dict, after: dict) -> dict:
    """Every check, each with `in_rule` (whether the mechanism verdict counts it), and the overall verdict (every
    applicable in-rule check passed). `before["patched"]` / `after["patched"]`: `cross_patch` of each state."""
    enc = lm.encode(setup.fact)
    checks = {
        "knockout": knockout_check(before, after),
        "extraction": extraction_check(lm, before, after, setup.heads,
                                       "sitemap" if setup.heads is not None else "direct_logit_before"),
        "sufficiency": sufficiency_check(before, after, setup),
        "necessity": necessity_check(before, after, setup),
        "ov_read": ov_check(before, after, setup.position),
        "enrichment": enrichment_check(before, after, setup.layer, setup.position, enc.tokens[setup.position]),
        "locality": locality_check(before, after),
    }
    for name, c in checks.items():
        c["in_rule"] = name in IN_RULE
    checks["passed"] = overall_rule([c.get("passed") for name, c in checks.items() if name in IN_RULE])
    return checks


def finite(value):
    """NaN/inf to None, for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
