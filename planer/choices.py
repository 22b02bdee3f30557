"""The engines and MoE lowerings a user picks from, in one torch-free place: the CLI offers them as choices
without importing the runtime (numpy) or the exporter (torch), so `planer --help` stays instant."""

ENGINES = ("ort", "ort-cuda", "trt")
LOWERINGS = ("ops", "ort-moe", "trt")  # how a MoE layer is exported: planer.export.lowering
SEARCH_METHODS = ("local", "gumbel")  # planer.search.local (Puzzle's), planer.search.search (PLANER's supernet)
TEACHERS = ("auto", "baseline", "continued")  # what a build distils from: planer.build.Budget.teacher
