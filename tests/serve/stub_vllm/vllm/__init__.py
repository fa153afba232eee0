"""A stand-in for vLLM in CPU tests: only the OpenAI server entry point, see entrypoints/cli/main.py."""
