"""Quick LocFT-BF settings check on the TUNING stream (the first 40 records of ../shared/data/counterfact-val.json,
disjoint from the reported streams): one joint LocFT-BF edit of the 40 requests, then WILD reliability and
generalisation (greedy 8 tokens contain the new target). Chose the defaults in data/results/long_run/tuning.md.

    OMP_NUM_THREADS=1 python recipes/locft_tune.py LAYER LR MINIBATCH EPOCHS
"""

import sys
import time

import locedit
from locedit.core.datasets import edit_request, read_facts
from locedit.verification.metrics import contains_target, greedy_generate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from long_run import DATA  # noqa: E402

layer, lr, bs, epochs = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lm = locedit.load("smollm2-135m")
facts = read_facts(DATA / "counterfact-val.json").facts[:40]
reqs = [edit_request(f) for f in facts]
t = time.perf_counter()
e = locedit.edit(lm, reqs, method="locft", layers=[layer], hparams={"lr": lr, "batch_size": bs, "num_steps": epochs})
seconds = (time.perf_counter() - t) / len(reqs)
gens = greedy_generate(lm, [r.fact.prompt for r in reqs], 8, batch=40)
rel = sum(contains_target(g, r.new_target) for g, r in zip(gens, reqs)) / len(reqs)
par = [(f.meta["paraphrases"][0], r) for f, r in zip(facts, reqs) if f.meta["paraphrases"]]
gens = greedy_generate(lm, [p for p, _ in par], 8, batch=40)
gen = sum(contains_target(g, r.new_target) for g, (_, r) in zip(gens, par)) / len(par)
print(f"layer {layer} lr {lr} minibatch {bs} epochs {epochs}: epoch losses {[round(x, 2) for x in e.losses[0]]}, "
      f"reliability {rel:.3f}, generalisation {gen:.3f}, {seconds:.2f} s/edit")
e.revert()
