"""The five facts the speed recipes (bench_gpu, bench_locate, bf16_vs_fp32) time; the model's own top-1 is the
target (random-init models have no true one)."""

from locedit import Fact

FACTS = [
    Fact("The Eiffel Tower", "The Eiffel Tower is located in the city of"),
    Fact("Rome", "Rome is the capital of"),
    Fact("Michael Jordan", "Michael Jordan is a professional"),
    Fact("The Colosseum", "The Colosseum is located in the city of"),
    Fact("Tokyo", "Tokyo is the capital of"),
]
