"""Verification of edits: behaviour metrics (CounterFact's, generation-based, CounterFact+'s NKL, fluency,
perplexity drift), mechanistic checks (does the new attribute go through the located mechanism?), `verify`,
`evaluate` over a fact set, and the before/after report."""

from locedit.verification.verify import Verification, verify, verify_models

__all__ = ["Verification", "verify", "verify_models", "evaluate", "verify_and_report"]


def __getattr__(name):  # heavier pieces load on first use
    if name == "evaluate":
        from locedit.verification.evaluate import evaluate

        return evaluate
    if name == "verify_and_report":
        from locedit.verification.report import verify_and_report

        return verify_and_report
    raise AttributeError(name)
