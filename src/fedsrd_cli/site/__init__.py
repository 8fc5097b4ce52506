"""What a site runs on its own model and data: transformers and peft live here.

    data         JSON-lines training and evaluation files, tokenization, batches
    model        loading the base, attaching LoRA, loading a state or an adapter, the losses
    quantization a 4-bit or 8-bit base through bitsandbytes (--base-quantization), and its refusals
    training     local training from the loaded state: plain and DP-SGD steps
    distributed  one site's training over several torchrun processes: ranks, shares, summed gradients
    evaluation   loss and perplexity per data file, exact match, answers, task metrics
    task_eval    scoring a model on tasks (multiple choice, GSM8K, MBPP) beyond the loss
    generation   greedy answers to prompts (used by evaluation and task_eval)
    task_metrics the scoring rules themselves (no model)
    sandbox      running generated programs confined (MBPP tests)
    uploads      what `sparsify` checks before the algorithm makes the upload

May import algorithms/, trust/, privacy/, files/ and math/; nothing here imports suites/,
simulation/, cli/ or flower/. transformers, peft and bitsandbytes are imported inside functions, so
importing a module here stays cheap.
"""
