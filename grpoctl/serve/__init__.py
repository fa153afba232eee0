"""grpoctl.serve: local serving of exported GGUFs.

    source.py     run / export / .gguf  ->  the GGUF to serve plus its training context
    gguf_info.py  chat template, end-of-turn tokens, context length from the GGUF header
    llamacpp.py   llama-cpp-python's OpenAI-compatible server as a supervised child process
    ollama.py     blob upload, model creation and chat through a running Ollama daemon
    common.py     smoke probe, model names, smoke report
    api.py        ``serve(ServeOptions)`` and ``stop(port)``: what ``grpoctl serve`` calls
"""
