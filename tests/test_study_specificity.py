"""locedit.study.specificity: the leakage identity its score rests on, and its keys on a tiny model."""

import torch

import locedit
import locedit.study.specificity as spec_recipe
import tiny
from locedit.editing.rank_one import rank_one


def test_rank_one_leakage_equals_delta_squared_over_specificity():
    # E_x[(ΔW x)²] over keys with E[xxᵀ] = C is ‖r‖² uᵀCu; for ROME's update it must equal ‖δ‖² / (kᵀC⁻¹k)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    C = A @ A.T + 0.5 * torch.eye(8, dtype=torch.float64)
    k = torch.randn(8, generator=g, dtype=torch.float64)
    delta = torch.randn(5, generator=g, dtype=torch.float64)
    r, u = rank_one(C.float(), k.float(), delta.float())
    r, u = r.double()[:, 0], u.double()[:, 0]
    leakage = (r @ r) * (u @ C @ u)
    s = spec_recipe.specificity(C.float(), k.float())
    assert abs(leakage.item() - (delta @ delta).item() / s) < 1e-4 * leakage.item()
    assert abs(spec_recipe.specificity(torch.eye(8), k.float()) - (k @ k).item()) < 1e-4 * (k @ k).item()


def test_template_keys_average_the_subject_last_inputs_of_every_layer():
    lm = tiny.lm("llama")
    fact = locedit.Fact("Pierre Curie", "Pierre Curie was a famous", " physicist")
    templates = ["{}", "Hello there. {}"]
    keys = spec_recipe.template_keys(lm, fact, templates)
    assert sorted(keys) == list(range(lm.num_layers))
    # layer 1 by hand: each template alone, input of the MLP output projection at the subject's last token
    from locedit.editing.values import templated_prompts

    rows, positions, _ = templated_prompts(lm, fact, templates, "subject_last", None)
    module = lm.adapter.layer_part(lm.model, 1, lm.adapter.mlp_down)
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach().clone()))
    with torch.no_grad():
        for ids, pos in zip(rows, positions):
            lm.model(input_ids=torch.tensor([ids]))
    h.remove()
    expected = torch.stack([x[pos] for x, pos in zip(seen, positions)]).float().mean(0)
    assert torch.allclose(keys[1], expected, atol=1e-5)
