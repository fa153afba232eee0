"""Serving manifests derived from the model's own chat template and the run's settings.

    templates.py   Jinja chat template -> Ollama Go template (probing the tokenizer's template)
    gorender.py    Go text/template renderer and the byte-for-byte check against transformers
    modelfile.py   Ollama's Modelfile format: quoting, parsing, writing
    ollama.py      what Ollama renders prompts with, the Modelfile TEMPLATE that keeps it the chat template, and
                   the export's Modelfiles planned from it
    vllm.py        vllm serve script, Compose file, Kubernetes objects, and the export's vLLM manifests planned
    context.py     what both planners read for one run (export, run, options) and the notes they leave
    api.py         write_manifests(): reads artifacts.json + run.json, writes and records everything in one step

Import from the submodules; this package stays light so ``grpoctl --help`` does not load them.
"""
