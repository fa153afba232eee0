"""Serving manifests derived from the model's own chat template and the run's settings.

    templates.py   Jinja chat template -> Ollama Go template (probing the tokenizer's template)
    gorender.py    Go text/template renderer and the byte-for-byte check against transformers
    modelfile.py   Ollama's Modelfile format: quoting, parsing, writing
    ollama.py      what Ollama renders prompts with, and the Modelfile TEMPLATE that keeps it the chat template
    vllm.py        vllm serve script, Compose file, Kubernetes objects
    api.py         write_manifests(): reads artifacts.json + run.json, writes and records everything

Import from the submodules; this package stays light so ``grpoctl --help`` does not load them.
"""
