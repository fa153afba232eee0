"""grpoctl.push: publishing an export to the Hugging Face Hub.

    hub.py        one repo per artifact family, uploaded through huggingface_hub
    modelcard.py  each repo's README.md, built from artifacts.json and the run
"""
